"""Local cloud tier: real Debian systemd hosts (systemd-nspawn) in lab network namespaces.

``lab.cloud.rootfs`` builds and caches the Debian 12/13 images (debootstrap);
``lab.cloud.lab`` (:class:`CloudLab`: prefix, key pair, mirror proxy, teardown) and
``lab.cloud.host`` (:class:`CloudHost`) boot them as hosts inside existing network
namespaces; ``lab.cloud.proxy`` is their only way out (apt to the Debian mirror),
``lab.cloud.cgroups`` their cgroups where PID 1 is not systemd, ``lab.cloud.cleanup``
removes what a crashed run left.  See the module docstrings for the pitfalls of this
machine and how they are handled.

Names are imported lazily, so ``python -m lab.cloud.cleanup`` / ``python -m
lab.cloud.rootfs`` run their module without importing it twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.cloud.cleanup import cleanup_prefix, leftovers
    from lab.cloud.common import CloudError, CloudInterrupted, detect_mode, requirements_missing
    from lab.cloud.host import BootTiming, CloudHost
    from lab.cloud.lab import CloudLab, parallel
    from lab.cloud.proxy import MirrorProxy
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
    **dict.fromkeys(("cleanup_prefix", "leftovers"), "lab.cloud.cleanup"),
    **dict.fromkeys(
        ("CloudError", "CloudInterrupted", "detect_mode", "requirements_missing"),
        "lab.cloud.common",
    ),
    **dict.fromkeys(("BootTiming", "CloudHost"), "lab.cloud.host"),
    **dict.fromkeys(("CloudLab", "parallel"), "lab.cloud.lab"),
    "MirrorProxy": "lab.cloud.proxy",
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
