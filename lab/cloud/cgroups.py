"""Per-host cgroups for the ``legacy`` launch mode (PID 1 is not systemd).

One directory per hierarchy below this process's own cgroup, created before
``systemd-nspawn --register=no --keep-unit`` is exec'd into it, emptied and
removed when the host stops (see :mod:`lab.cloud.host`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from lab.cloud.common import CGROUP_ROOT


def self_cgroups() -> dict[str, str]:
    """``{hierarchy directory under /sys/fs/cgroup: this process's path in it}``."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            name = "unified" if (CGROUP_ROOT / "unified").is_dir() else ""
        else:
            name = controllers.replace("name=", "")
            if not (CGROUP_ROOT / name).is_dir():
                # co-mounted controllers such as "cpu,cpuacct" may be mounted under either name
                alt = [n for n in controllers.split(",") if (CGROUP_ROOT / n).is_dir()]
                if not alt:
                    continue
                name = alt[0]
        out[name] = path
    return out


def cgroup_mountpoint(name: str) -> Path:
    return CGROUP_ROOT / name if name else CGROUP_ROOT


class CgroupSet:
    """One directory per hierarchy for one host (legacy mode only)."""

    def __init__(self, leaf: str) -> None:
        self.leaf = leaf
        self.dirs: list[Path] = []
        for name, path in sorted(self_cgroups().items()):
            base = cgroup_mountpoint(name) / path.lstrip("/")
            self.dirs.append(base / leaf)

    def create(self) -> list[Path]:
        """Create the directories; return the ``cgroup.procs`` files to join."""
        procs = []
        for d in self.dirs:
            d.mkdir(exist_ok=True)
            if (d / "cpuset.cpus").exists():
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (d / f).read_text().strip():
                        (d / f).write_text((d.parent / f).read_text())
            procs.append(d / "cgroup.procs")
        return procs

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            if not d.is_dir():
                continue
            for sub, _dirs, files in os.walk(d):
                if "cgroup.procs" in files:
                    with contextlib.suppress(OSError, ValueError):
                        found.update(int(x) for x in Path(sub, "cgroup.procs").read_text().split())
        return found

    def memory_dir(self) -> Path | None:
        for d in self.dirs:
            if str(d).startswith(f"{CGROUP_ROOT}/memory/") and d.is_dir():
                return d
        return None

    def remove(self, timeout: float = 10.0) -> list[str]:
        """rmdir every directory bottom-up; returns what could not be removed."""
        left = []
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            if not d.is_dir():
                continue
            subdirs = sorted(
                (Path(s) for s, _, _ in os.walk(d)), key=lambda p: len(p.parts), reverse=True
            )
            for s in subdirs:
                for _ in range(int(timeout / 0.1) + 1):
                    try:
                        s.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                            left.append(f"{s}: {exc.strerror}")
                            break
                        time.sleep(0.1)
        return left


def cgroup_empty(cg: CgroupSet) -> bool:
    return not cg.pids()
