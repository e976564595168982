"""Local cloud tier: real Debian systemd hosts (systemd-nspawn) in lab network namespaces.

``lab.cloud.rootfs`` builds and caches the Debian 12/13 images (debootstrap),
``lab.cloud.nspawn`` boots them as hosts inside existing network namespaces
(:class:`CloudLab`, :class:`CloudHost`).  See the module docstrings for the
pitfalls of this machine and how they are handled.

Names are imported lazily, so ``python -m lab.cloud.nspawn`` / ``python -m
lab.cloud.rootfs`` run their module without importing it twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.cloud.nspawn import (
        BootTiming,
        CloudError,
        CloudHost,
        CloudInterrupted,
        CloudLab,
        MirrorProxy,
        cleanup_prefix,
        detect_mode,
        leftovers,
        parallel,
        requirements_missing,
    )
    from lab.cloud.rootfs import (
        PACKAGES,
        ROOTFS_VERSION,
        Mirror,
        RootfsImage,
        apt_mirror,
        ensure_rootfs,
        ensure_tree,
        mirror_reachable,
        suite_of,
    )

_WHERE = {
    **dict.fromkeys(
        (
            "BootTiming",
            "CloudError",
            "CloudHost",
            "CloudInterrupted",
            "CloudLab",
            "MirrorProxy",
            "cleanup_prefix",
            "detect_mode",
            "leftovers",
            "parallel",
            "requirements_missing",
        ),
        "lab.cloud.nspawn",
    ),
    **dict.fromkeys(
        (
            "PACKAGES",
            "ROOTFS_VERSION",
            "Mirror",
            "RootfsImage",
            "apt_mirror",
            "ensure_rootfs",
            "ensure_tree",
            "mirror_reachable",
            "suite_of",
        ),
        "lab.cloud.rootfs",
    ),
}

__all__ = [
    "PACKAGES",
    "ROOTFS_VERSION",
    "BootTiming",
    "CloudError",
    "CloudHost",
    "CloudInterrupted",
    "CloudLab",
    "Mirror",
    "MirrorProxy",
    "RootfsImage",
    "apt_mirror",
    "cleanup_prefix",
    "detect_mode",
    "ensure_rootfs",
    "ensure_tree",
    "leftovers",
    "mirror_reachable",
    "parallel",
    "requirements_missing",
    "suite_of",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lab.cloud' has no attribute {name!r}")
