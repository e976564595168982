"""What a crashed local-cloud run left behind, and its removal.

``python -m lab.cloud.cleanup`` lists the prefixes with leftovers;
``python -m lab.cloud.cleanup --cleanup PREFIX`` removes them (processes by PID,
mounts, cgroups, nspawn runtime dirs, the work directory).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lab.cloud.cgroups import CgroupSet, cgroup_empty, cgroup_mountpoint, self_cgroups
from lab.cloud.common import (
    NSPAWN_RUN_DIRS,
    PREFIX_RE,
    STOP_TIMEOUT,
    WORK_ROOT,
    mounts,
    pid_alive,
    wait_until,
)
from lab.netns import child_pids


def leftovers(prefix: str) -> list[str]:
    """Everything a run with ``prefix`` could have left behind (empty list = clean)."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a lab.cloud prefix: {prefix!r}")
    found: list[str] = []
    work = WORK_ROOT / prefix
    if work.exists():
        found.append(f"dir {work}")
    found += [f"mount {m}" for m in mounts() if m.startswith(str(work) + "/") or m == str(work)]
    for name, path in self_cgroups().items():
        for base in {cgroup_mountpoint(name), cgroup_mountpoint(name) / path.lstrip("/")}:
            found += [f"cgroup {d}" for d in base.glob(f"{prefix}-*")]
    for d in NSPAWN_RUN_DIRS:
        found += [f"nspawn dir {p}" for p in d.glob(f"{prefix}-*")]
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f"--machine={prefix}-" in cmd or f"{WORK_ROOT}/{prefix}/" in cmd:
                found.append(f"process {p.name}: {cmd[:120]}")
    with contextlib.suppress(OSError):
        for m in Path("/var/lib/machines").glob(f"{prefix}-*"):
            found.append(f"machine {m}")
    return found


def list_prefixes() -> list[str]:
    with contextlib.suppress(OSError):
        return sorted(p.name for p in WORK_ROOT.iterdir() if PREFIX_RE.match(p.name))
    return []


def cleanup_prefix(prefix: str, timeout: float = 60.0) -> list[str]:
    """Best-effort removal of what a crashed run left (processes by PID, mounts, cgroups, dirs).
    Returns what is still left."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a lab.cloud prefix: {prefix!r}")
    work = WORK_ROOT / prefix
    # nspawn supervisors of this prefix: SIGTERM (orderly), then SIGKILL them and their containers
    sup = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if any(a.decode(errors="replace").startswith(f"--machine={prefix}-") for a in cmd):
                    sup.append(int(p.name))
    kids = {pid: child_pids(pid) for pid in sup}
    for pid in sup:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not any(pid_alive(p) for p in sup), min(timeout, STOP_TIMEOUT))
    for pid in sup + [k for ks in kids.values() for k in ks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name, path in self_cgroups().items():
        for base in {cgroup_mountpoint(name), cgroup_mountpoint(name) / path.lstrip("/")}:
            for d in base.glob(f"{prefix}-*"):
                cg = CgroupSet.__new__(CgroupSet)
                cg.leaf, cg.dirs = d.name, [d]
                for pid in cg.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(functools.partial(cgroup_empty, cg), 5)
                cg.remove()
    for m in sorted((m for m in mounts() if m.startswith(str(work) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
    for d in NSPAWN_RUN_DIRS:
        for p in d.glob(f"{prefix}-*"):
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", str(p)], timeout=30, check=False
            )
    if work.exists() and not any(m.startswith(str(work) + "/") for m in mounts()):
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(work)], timeout=300, check=False
        )
    return leftovers(prefix)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.cloud.cleanup", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--list", action="store_true", help="list prefixes with leftovers")
    ap.add_argument("--cleanup", metavar="PREFIX", help="remove what run PREFIX left behind")
    args = ap.parse_args(argv)
    if args.cleanup:
        left = cleanup_prefix(args.cleanup)
        print("\n".join(left) if left else f"{args.cleanup}: clean")
        return 1 if left else 0
    for p in list_prefixes():
        print(p, json.dumps(leftovers(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
