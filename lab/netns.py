"""Network-namespace primitives for the local lab.

This module knows nothing about the HA cluster; ``lab.topology`` builds the
Hetzner-like topology on top of it.  What lives here:

* :func:`requirements_missing` - why the lab tier cannot run here (or ``None``).
* :class:`Host` - one network namespace standing in for one server:
  ``run`` a command in it, ``popen`` a daemon in it (tracked by PID, killed as a
  process group), ``call`` a Python function with the calling thread switched
  into the namespace (sockets created there stay in that namespace).
* :func:`leftovers` / :func:`cleanup_prefix` / :func:`list_prefixes` - find and
  remove what a run with a given name prefix left behind (e.g. after SIGKILL).
  Also available as ``python -m lab.netns --list`` / ``--cleanup PREFIX``.

Safety rules the lab follows (and that every helper here enforces):

* every name carries a random per-run prefix (``hw`` + 4 hex digits);
* nothing is created in the root network namespace: even the bridges live in
  a namespace of their own (``<prefix>-sw``), so the host's own networking,
  firewall and sysctls are never touched;
* processes are stopped by PID / process group, never by name;
* every wait is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

#: Every lab namespace name starts with this, then 4 hex digits, then ``-``.
PREFIX_STEM = "hw"
PREFIX_RE = re.compile(r"hw[0-9a-f]{4}")
#: Linux limit for interface names (IFNAMSIZ - 1).
IFNAME_MAX = 15
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

#: Tools the lab tier needs; ``requirements_missing`` checks them.
REQUIRED_TOOLS = ("ip", "haproxy", "keepalived", "apache2", "curl")
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

DEFAULT_RUN_TIMEOUT = 10.0
DEFAULT_KILL_TIMEOUT = 5.0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc; [] once it is gone."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for t in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                out.extend(int(x) for x in (t / "children").read_text().split())
    return out


class LabError(RuntimeError):
    """Something in the lab harness went wrong."""


class CommandError(LabError):
    """A command exited non-zero (``check=True``)."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command failed (exit {returncode}): {' '.join(self.argv)}\n"
            f"stderr: {stderr.strip()}\nstdout: {stdout.strip()}"
        )


def which(tool: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (PATH may lack them)."""
    found = shutil.which(tool)
    if found:
        return found
    for d in _SBIN_DIRS:
        candidate = Path(d) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def requirements_missing(tools: Iterable[str] = REQUIRED_TOOLS) -> str | None:
    """Return a human-readable reason why the lab cannot run here, or ``None``.

    Checks: running as root (network namespaces need CAP_NET_ADMIN and
    CAP_SYS_ADMIN), and each tool in ``tools`` on PATH or in an sbin directory.
    """
    reasons = []
    if os.geteuid() != 0:
        reasons.append(f"not running as root (euid {os.geteuid()}); network namespaces need root")
    if not sys.platform.startswith("linux"):
        reasons.append(f"not Linux ({sys.platform})")
    missing = [t for t in tools if which(t) is None]
    if missing:
        reasons.append("missing tools: " + ", ".join(missing))
    if not reasons:
        return None
    return "lab tier cannot run: " + "; ".join(reasons)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = DEFAULT_RUN_TIMEOUT,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (in the caller's namespace), capture text output, bounded by ``timeout``."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def ip(*args: str, check: bool = True, timeout: float = DEFAULT_RUN_TIMEOUT) -> str:
    """Run ``ip ARGS`` and return stdout."""
    return run(["ip", *args], check=check, timeout=timeout).stdout


def new_prefix(max_tries: int = 20) -> str:
    """A fresh random prefix (``hw`` + 4 hex digits) not used by any namespace now."""
    used = set(list_prefixes())
    for _ in range(max_tries):
        prefix = PREFIX_STEM + secrets.token_hex(2)
        if prefix not in used:
            return prefix
    raise LabError(f"could not find an unused lab prefix in {max_tries} tries")


def check_ifname(name: str) -> str:
    if not name or len(name) > IFNAME_MAX:
        raise LabError(f"interface name {name!r} is empty or longer than {IFNAME_MAX} characters")
    return name


# --------------------------------------------------------------------------
# namespace bookkeeping


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = ip("netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_prefixes() -> list[str]:
    """Prefixes of lab runs that still have namespaces on this machine (any run, any user)."""
    found = set()
    for ns in list_namespaces():
        head = ns.split("-", 1)[0]
        if PREFIX_RE.fullmatch(head) and "-" in ns:
            found.add(head)
    return sorted(found)


def _root_links() -> list[str]:
    out = ip("-o", "link", "show", check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def leftovers(prefix: str) -> list[str]:
    """What a run with ``prefix`` left behind: ``netns:<name>`` and ``link:<name>`` entries.

    Links are looked for in the root namespace only (the lab never creates any
    there; this is a guard).  Links inside a lab namespace go away with it.
    """
    _validate_prefix(prefix)
    out = [f"netns:{ns}" for ns in list_namespaces() if ns.startswith(prefix + "-")]
    out += [f"link:{name}" for name in _root_links() if name.startswith(prefix)]
    return out


def _validate_prefix(prefix: str) -> None:
    if not PREFIX_RE.fullmatch(prefix):
        raise LabError(f"not a lab prefix: {prefix!r} (expected {PREFIX_STEM} + 4 hex digits)")


def netns_pids(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns`` (never our own)."""
    out = ip("netns", "pids", ns, check=False)
    me = os.getpid()
    return [int(p) for p in out.split() if p.isdigit() and int(p) != me]


def kill_namespace_processes(ns: str, *, timeout: float = 3.0) -> list[int]:
    """SIGTERM then SIGKILL every process living in ``ns``; bounded by ``timeout``.

    Returns the PIDs that were found.  Each PID is re-read from the namespace
    right before signalling, so an unrelated process can't be hit.
    """
    found: list[int] = []
    deadline = time.monotonic() + timeout
    for round_no in range(6):
        pids = netns_pids(ns)
        if not pids:
            break
        found.extend(p for p in pids if p not in found)
        sig = signal.SIGTERM if round_no == 0 else signal.SIGKILL
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        _sleep_until(lambda: not netns_pids(ns), min(deadline, time.monotonic() + 1.0))
        if time.monotonic() >= deadline:
            break
    return found


def delete_namespace(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it (no error if it is already gone)."""
    if not (NETNS_DIR / ns).exists():
        return
    kill_namespace_processes(ns)
    ip("netns", "delete", ns, check=False)


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove everything of a run with ``prefix``: its processes, namespaces and root links.

    Returns what was removed.  Use it after a run was SIGKILLed; a normal run
    cleans up after itself.  Only touches names starting with ``prefix-``.
    """
    _validate_prefix(prefix)
    removed = []
    for item in leftovers(prefix):
        kind, name = item.split(":", 1)
        if kind == "netns":
            delete_namespace(name)
        else:
            ip("link", "delete", name, check=False)
        removed.append(item)
    return removed


def _sleep_until(cond: Callable[[], bool], deadline: float, step: float = 0.02) -> bool:
    """Poll ``cond`` until true or ``deadline`` (monotonic); bounded."""
    max_polls = 10_000
    for _ in range(max_polls):
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return cond()


# --------------------------------------------------------------------------
# switching a thread into a namespace

_libc: Any = None


def _setns_current_thread(ns: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(
    ns: str, fn: Callable[..., T], *args: Any, timeout: float = 30.0, **kwargs: Any
) -> T:
    """Run ``fn(*args, **kwargs)`` in a fresh thread switched into network namespace ``ns``.

    Only the network namespace changes (``setns(CLONE_NEWNET)`` on that one
    thread); the file system, PIDs and the rest of the process are shared.
    Sockets created inside ``fn`` belong to ``ns`` for their whole life (and
    keep it alive: close them).  Raises ``TimeoutError`` if ``fn`` takes longer
    than ``timeout`` (the thread is a daemon and is left to finish on its own,
    so ``fn`` must bound its own loops).
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            _setns_current_thread(ns)
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in {ns} did not finish within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result["value"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------
# hosts


class Host:
    """A network namespace standing in for one server.

    Attributes filled in by the topology: ``public_ip``/``public_iface`` (or
    ``None`` if the host has no public side), ``private_ip``/``private_iface``.
    """

    def __init__(self, name: str, ns: str, logdir: Path) -> None:
        self.name = name
        self.ns = ns
        self.logdir = logdir
        self.public_ip: str | None = None
        self.public_iface: str | None = None
        self.private_ip: str | None = None
        self.private_iface: str | None = None
        #: switch-side ports of this host's links (set by the topology)
        self.switch_ports: list[str] = []
        self._procs: dict[int, subprocess.Popen[Any]] = {}
        self._logs: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._counter = 0

    def __repr__(self) -> str:
        addrs = f"public={self.public_ip}, private={self.private_ip}"
        return f"Host({self.name!r}, ns={self.ns!r}, {addrs})"

    # -- commands ---------------------------------------------------------
    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = DEFAULT_RUN_TIMEOUT,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace, wait (bounded), capture text output."""
        return run(self.exec_argv(argv), check=check, timeout=timeout, input=input, env=env)

    def popen(
        self,
        argv: Sequence[str],
        *,
        log: str | Path | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace as a new session/process group.

        The process is tracked by PID and stopped by :meth:`kill` / teardown
        (SIGTERM to its process group, then SIGKILL).  Unless ``stdout`` is
        given, stdout and stderr go to a log file (``log`` or
        ``<logdir>/<host>-<prog>-<n>.log``, see :meth:`log_path`).  Other
        keyword arguments go to ``subprocess.Popen``.
        """
        if not argv:
            raise LabError("popen: empty argv")
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw["start_new_session"] = True
        logfile: IO[bytes] | None = None
        with self._lock:
            self._counter += 1
            n = self._counter
        path: Path | None = None
        if "stdout" not in kw:
            path = Path(log) if log else self.logdir / f"{self.name}-{Path(argv[0]).name}-{n}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            logfile = open(path, "ab")  # noqa: SIM115 - handed to the child, closed below
            kw["stdout"] = logfile
            kw.setdefault("stderr", subprocess.STDOUT)
        try:
            proc = subprocess.Popen(self.exec_argv(argv), **kw)
        finally:
            if logfile is not None:
                logfile.close()
        with self._lock:
            self._procs[proc.pid] = proc
            if path is not None:
                self._logs[proc.pid] = path
        return proc

    def log_path(self, proc: subprocess.Popen[Any]) -> Path | None:
        """Log file of a process started by :meth:`popen` (``None``: it had its own stdout)."""
        return self._logs.get(proc.pid)

    @property
    def processes(self) -> list[subprocess.Popen[Any]]:
        """Processes started here and not yet killed/reaped by :meth:`kill`."""
        with self._lock:
            return list(self._procs.values())

    def kill(
        self,
        proc: subprocess.Popen[Any],
        sig: int = signal.SIGTERM,
        timeout: float = DEFAULT_KILL_TIMEOUT,
    ) -> int | None:
        """Signal ``proc``'s process group with ``sig``; SIGKILL it if it outlives ``timeout``.

        Returns the exit status (``None`` only if even SIGKILL did not end it
        in time).  Use ``sig=signal.SIGKILL`` to simulate a crash.  Whatever
        the leader left in its process group is SIGKILLed before the leader is
        reaped, so the group id cannot have been reused by then.
        """
        pid = proc.pid  # start_new_session=True: the leader's PID is the group id
        if proc.returncode is None:
            _killpg(pid, sig)
            if not _wait_exited(pid, timeout):
                _killpg(pid, signal.SIGKILL)
                _wait_exited(pid, 2.0)
            _killpg(pid, signal.SIGKILL)  # leftovers of the group; the leader is a zombie at most
        try:
            rc: int | None = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None:
            with self._lock:
                self._procs.pop(proc.pid, None)
        return rc

    def kill_all(self, timeout: float = DEFAULT_KILL_TIMEOUT) -> None:
        """Stop every tracked process, then anything else still running in the namespace."""
        procs = self.processes
        for proc in procs:
            if proc.returncode is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            left = max(0.1, deadline - time.monotonic())
            self.kill(proc, signal.SIGTERM, timeout=left)
        if (NETNS_DIR / self.ns).exists():
            kill_namespace_processes(self.ns)

    # -- python in the namespace -------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0, **kwargs: Any) -> T:
        """Run a Python callable in a thread inside this namespace (see :func:`call_in_netns`)."""
        return call_in_netns(self.ns, fn, *args, timeout=timeout, **kwargs)

    # -- small conveniences ------------------------------------------------
    def sysctl(self, key: str, value: str | int) -> None:
        """Set a (network-namespaced) sysctl, e.g. ``net.ipv4.ip_nonlocal_bind``."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def ip(self, *args: str, check: bool = True) -> str:
        """Run ``ip -n <ns> ARGS`` and return stdout."""
        return ip("-n", self.ns, *args, check=check)


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait (bounded) until child ``pid`` has exited, without reaping it."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        try:
            res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True  # already reaped elsewhere
        if res is not None and res.si_pid == pid:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return False


def _killpg(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgid(0):
        return  # never signal init or our own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.netns", description=__doc__.split("\n\n")[0]
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--list", action="store_true", help="list prefixes of lab runs that left namespaces"
    )
    group.add_argument("--leftovers", metavar="PREFIX", help="show what a run left behind")
    group.add_argument("--cleanup", metavar="PREFIX", help="remove what a run left behind")
    group.add_argument("--check", action="store_true", help="say whether the lab can run here")
    args = parser.parse_args(argv)
    if args.check:
        reason = requirements_missing()
        print(reason or "lab requirements met")
        return 1 if reason else 0
    if args.list:
        for prefix in list_prefixes():
            print(prefix)
        return 0
    if args.leftovers:
        for item in leftovers(args.leftovers):
            print(item)
        return 0
    for item in cleanup_prefix(args.cleanup):
        print("removed", item)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
