"""Local cloud tier: real Debian systemd hosts (systemd-nspawn) in lab network namespaces.

``lab.cloud.rootfs`` builds and caches the Debian 12/13 images (debootstrap),
``lab.cloud.nspawn`` boots them as hosts inside existing network namespaces
(:class:`CloudLab`, :class:`CloudHost`).  See the module docstrings for the
pitfalls of this machine and how they are handled.
"""

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
    mirror_reachable,
    suite_of,
)

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
    "leftovers",
    "mirror_reachable",
    "parallel",
    "requirements_missing",
    "suite_of",
]
