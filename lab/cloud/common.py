"""What every part of the local cloud tier shares: paths, limits, errors, host checks.

Also the small process helpers (is a PID alive, bounded waits, memory of a PID, the
mount table) that the hosts (:mod:`lab.cloud.host`), the lab (:mod:`lab.cloud.lab`)
and the leftover cleanup (:mod:`lab.cloud.cleanup`) use alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

NETNS_DIR = Path("/run/netns")
#: Per-run prefixes: ``hc`` + 4 hex digits (``lab.netns`` uses ``hw``).
PREFIX_STEM = "hc"
PREFIX_RE = re.compile(r"^hc[0-9a-f]{4}$")
#: Per-run work directories live below this (``<WORK_ROOT>/<prefix>``).
WORK_ROOT = Path(os.environ.get("HCLOUD_HA_WEB_WORK", "/var/tmp/hcloud-ha-web"))
#: Where the mirror proxy listens inside every host namespace.
PROXY_ADDR = ("127.0.0.1", 3142)

BOOT_TIMEOUT = 180.0
MEMORY_SAMPLE_INTERVAL = 0.5
#: Upper bound for the memory sampler thread's life (it stops at close anyway).
MEMORY_SAMPLER_MAX_SECONDS = 24 * 3600
STOP_TIMEOUT = 30.0
SSH_TIMEOUT = 120.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_RUN_DIRS = (Path("/run/systemd/nspawn/propagate"), Path("/run/systemd/nspawn/unix-export"))

REQUIRED_TOOLS = (
    "systemd-nspawn",
    "debootstrap",
    "ssh",
    "ssh-keygen",
    "nsenter",
    "tar",
    "mount",
    "umount",
)

Log = Callable[[str], None]


class CloudError(RuntimeError):
    """Something in the local cloud harness went wrong."""


class CloudInterrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP while a :class:`CloudLab` is open."""


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/local/sbin:/usr/sbin:/sbin")


def requirements_missing() -> str | None:
    """Why hosts cannot be booted here (``None`` when they can)."""
    if os.geteuid() != 0:
        return "local cloud tier needs root (network namespaces, mounts, systemd-nspawn)"
    missing = [t for t in REQUIRED_TOOLS if not which(t)]
    if missing:
        return (
            f"missing tools: {', '.join(missing)} "
            "(apt-get install debootstrap systemd-container openssh-client util-linux)"
        )
    return None


def detect_mode() -> str:
    """``systemd`` when PID 1 is systemd (plain nspawn path), else ``legacy``."""
    forced = os.environ.get("HCLOUD_HA_WEB_NSPAWN_MODE")
    if forced in ("systemd", "legacy"):
        return forced
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError:
        comm = ""
    return "systemd" if comm == "systemd" and Path("/run/systemd/system").is_dir() else "legacy"


def new_prefix(max_tries: int = 20) -> str:
    for _ in range(max_tries):
        p = PREFIX_STEM + secrets.token_hex(2)
        if not (WORK_ROOT / p).exists():
            return p
    raise CloudError("could not find a free prefix")


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies count as gone
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if cond():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    return cond()


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mounts() -> list[str]:
    """Mount points of this mount namespace (``/proc/self/mountinfo``), unescaped."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            out.append(line.split()[4].encode().decode("unicode_escape"))
    return out
