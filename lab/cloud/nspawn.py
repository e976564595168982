"""Real Debian systemd hosts for the local cloud tier: ``systemd-nspawn --boot`` in a netns.

The seam to the lab topology is deliberately small: a host is booted *inside
an existing network namespace given by name* (``/run/netns/<name>``).  This
module never creates, wires or deletes network namespaces; whoever owns the
topology does (``lab.netns`` / ``lab.topology``, or the small helper in
``tests/cloud/conftest.py``).  The container sees exactly the interfaces and
addresses of that namespace, with ``CAP_NET_ADMIN`` and a writable
``/proc/sys/net`` so provisioning can add the floating IP and set
``net.ipv4.ip_nonlocal_bind``.

Usage::

    with CloudLab() as lab:  # per-run prefix, key pair, workdir
        h = lab.host("lb1", netns="hw1a2b-lb1", suite="trixie")
        lab.boot(h)  # parallel start + bounded wait
        h.ssh("apt-get install -y haproxy", timeout=600)
        h.reboot()  # relaunch: same rootfs, same netns
    # everything torn down (also on exceptions, SIGINT, SIGTERM, SIGHUP, exit)

How hosts reach the package mirror (and nothing else)
------------------------------------------------------
Each host namespace gets *no* route out.  Instead the lab process opens a
listening socket on ``127.0.0.1:3142`` *inside the host's namespace* (a
thread does ``setns(CLONE_NEWNET)``, binds, and the socket stays in that
namespace), and serves it from the root namespace as a tiny HTTP proxy that
forwards only to the Debian mirror host(s) this machine's apt uses (resolved at
run time by the machine's resolver).  The image's apt points at it
(``Acquire::http::Proxy``), so ``apt-get install`` inside works exactly as on
a server, and every other destination is unreachable.  Immutable files
(``pool/*.deb``, ``by-hash``) are cached under
``<cache_dir>/apt-proxy`` and reused by later hosts and runs (apt still
verifies every file against the signed Release).  This needs no address, veth,
route, NAT rule or ``ip_forward`` change in the root namespace (on this
machine ``ip_forward`` is 0 and neither iptables nor nft is installed; turning
on forwarding would change the whole machine).  DNS: there is none inside
(``/etc/resolv.conf`` has no nameserver); apt never resolves the mirror itself
because it talks to the proxy.

Two launch modes (:func:`detect_mode`)
--------------------------------------
``legacy`` (PID 1 is not systemd, e.g. this machine: cgroup v1 + a cgroup2 at
``/sys/fs/cgroup/unified``): the lab creates one cgroup directory per host in
every hierarchy (below the lab process's own cgroup), moves a small ``sh``
wrapper into them and execs ``systemd-nspawn --register=no --keep-unit``, with
``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` (Debian 13's systemd 257 refuses to boot
on cgroup v1/hybrid; Debian 12's 252 is happy with it too) and
``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network``.  ``systemd`` (an ordinary systemd
machine): plain ``systemd-nspawn``, registered with machined, which creates
its scope.  ``HCLOUD_HA_WEB_NSPAWN_MODE=legacy|systemd`` overrides detection.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import functools
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from lab.cloud.rootfs import (
    DEFAULT_CACHE_DIR,
    Mirror,
    RootfsImage,
    apt_mirror,
    ensure_rootfs,
    ensure_tree,
    extract,
    suite_of,
)
from lab.netns import call_in_netns, child_pids

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
_T = TypeVar("_T")
_R = TypeVar("_R")


class CloudError(RuntimeError):
    """Something in the local cloud harness went wrong."""


class CloudInterrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP while a :class:`CloudLab` is open."""


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/local/sbin:/usr/sbin:/sbin")


def requirements_missing() -> str | None:
    """Why hosts cannot be booted here (``None`` when they can)."""
    if os.geteuid() != 0:
        return "local cloud tier needs root (network namespaces, mounts, systemd-nspawn)"
    missing = [t for t in REQUIRED_TOOLS if not _which(t)]
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


# --------------------------------------------------------------------------- netns helpers


def socket_in_netns(netns: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A listening TCP socket bound to ``addr`` inside ``/run/netns/<netns>``.

    Created by a short-lived thread switched into the namespace (only that
    thread changes namespace); the socket keeps its namespace for life.
    Brings ``lo`` up first when ``addr`` is a loopback address.
    """
    path = NETNS_DIR / netns
    if not path.exists():
        raise CloudError(f"network namespace {netns!r} does not exist ({path})")
    if addr[0].startswith("127."):
        subprocess.run(
            ["ip", "-n", netns, "link", "set", "lo", "up"],
            check=True,
            timeout=10,
            capture_output=True,
        )
    return call_in_netns(netns, _listening_socket, addr, timeout=timeout)


def _listening_socket(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(64)
    return s


# --------------------------------------------------------------------------- mirror proxy

_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_CACHEABLE = re.compile(
    r"^/[\w.+~%-]+(?:/[\w.+~%-]+)*/(?:pool/.+\.u?deb|dists/.+/by-hash/\w+/[0-9a-f]{32,})$"
)


class MirrorProxy:
    """HTTP proxy for apt that forwards only to the Debian mirror host(s).

    One instance serves any number of namespaces: :meth:`listen` binds a
    socket inside a namespace and serves it from a thread of this process.
    """

    def __init__(
        self,
        mirror: Mirror,
        cache_dir: Path | None,
        log_file: Path,
        upstream_timeout: float = 60.0,
    ) -> None:
        self.mirror = mirror
        self.allowed = set(mirror.hosts)
        self.cache_dir = cache_dir
        self.upstream_timeout = upstream_timeout
        self._log = open(log_file, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._servers: dict[str, tuple[ThreadingHTTPServer, threading.Thread]] = {}
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "bytes": 0, "cache_hits": 0, "denied": 0, "errors": 0}

    def log(self, msg: str) -> None:
        with contextlib.suppress(ValueError):
            self._log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def listen(self, netns: str, addr: tuple[str, int] = PROXY_ADDR) -> None:
        with self._lock:
            if netns in self._servers:
                return
        sock = socket_in_netns(netns, addr)
        proxy = self

        class Handler(_ProxyHandler):
            pass

        Handler.proxy = proxy
        server = ThreadingHTTPServer(addr, Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        t = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name=f"mirror-proxy-{netns}",
            daemon=True,
        )
        t.start()
        with self._lock:
            self._servers[netns] = (server, t)
        self.log(f"listening in {netns} on {addr[0]}:{addr[1]} for {sorted(self.allowed)}")

    def unlisten(self, netns: str) -> None:
        with self._lock:
            entry = self._servers.pop(netns, None)
        if entry:
            server, t = entry
            server.shutdown()  # returns once serve_forever's loop has seen it (<= poll_interval)
            server.server_close()
            t.join(5)

    def close(self) -> None:
        for netns in list(self._servers):
            self.unlisten(netns)
        with contextlib.suppress(Exception):
            self._log.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: MirrorProxy
    protocol_version = "HTTP/1.1"
    server_version = "hcloud-ha-web-lab-mirror-proxy"
    timeout = 120  # idle client connections are closed

    _upstream: http.client.HTTPConnection | None = None
    _upstream_host: str = ""

    def log_message(self, format: str, *args: Any) -> None:
        self.proxy.log(format % args)

    def do_GET(self) -> None:
        self._forward(head=False)

    def do_HEAD(self) -> None:
        self._forward(head=True)

    def _deny(self, code: int, why: str) -> None:
        self.proxy.count("denied")
        self.send_error(code, why)

    def _connection(self, netloc: str) -> http.client.HTTPConnection:
        if self._upstream is None or self._upstream_host != netloc:
            if self._upstream is not None:
                self._upstream.close()
            self._upstream = http.client.HTTPConnection(netloc, timeout=self.proxy.upstream_timeout)
            self._upstream_host = netloc
        return self._upstream

    def _forward(self, head: bool) -> None:
        p = self.proxy
        p.count("requests")
        url = urllib.parse.urlsplit(self.path)
        netloc = url.netloc.lower()
        if netloc.endswith(":80"):
            netloc = netloc[:-3]
        if url.scheme != "http" or netloc not in p.allowed:
            self._deny(
                403, f"the lab lets hosts reach the Debian mirror only, not {self.path[:200]}"
            )
            return
        target = url.path + (f"?{url.query}" if url.query else "")
        cache_file = None
        if (
            p.cache_dir is not None
            and not head
            and "Range" not in self.headers
            and ".." not in url.path
            and _CACHEABLE.match(url.path)
        ):
            cache_file = p.cache_dir / netloc / url.path.lstrip("/")
            if cache_file.is_file():
                self._serve_file(cache_file)
                return
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"
        }
        headers["Host"] = netloc
        resp = None
        for attempt in range(2):  # one retry on a stale keep-alive upstream connection
            conn = self._connection(netloc)
            try:
                conn.request("HEAD" if head else "GET", target, headers=headers)
                resp = conn.getresponse()
                break
            except (
                http.client.RemoteDisconnected,
                ConnectionError,
                http.client.BadStatusLine,
            ) as exc:
                conn.close()
                self._upstream = None
                if attempt == 1:
                    p.count("errors")
                    self.send_error(502, f"mirror: {exc}")
                    return
            except OSError as exc:
                conn.close()
                self._upstream = None
                p.count("errors")
                self.send_error(502, f"mirror: {exc}")
                return
        assert resp is not None
        try:
            self._relay(resp, head, cache_file)
        finally:
            if resp.will_close and self._upstream is not None:
                self._upstream.close()
                self._upstream = None

    def _relay(self, resp: http.client.HTTPResponse, head: bool, cache_file: Path | None) -> None:
        p = self.proxy
        length = resp.getheader("Content-Length")
        chunked = "chunked" in (resp.getheader("Transfer-Encoding") or "").lower()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            resp.read()
            return
        if length is None or chunked:
            body = resp.read()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            p.count("bytes", len(body))
            return
        total = int(length)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        tmp = None
        out = None
        if cache_file is not None and resp.status == 200:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{threading.get_ident()}.part")
            out = open(tmp, "wb")  # noqa: SIM115 - closed in the finally below
        done = 0
        try:
            while done < total:
                chunk = resp.read(min(1 << 16, total - done))
                if not chunk:
                    break
                self.wfile.write(chunk)
                if out:
                    out.write(chunk)
                done += len(chunk)
        finally:
            p.count("bytes", done)
            if out is not None and tmp is not None and cache_file is not None:
                out.close()
                if done == total:
                    os.replace(tmp, cache_file)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        if done != total:
            self.close_connection = True

    def _serve_file(self, path: Path) -> None:
        p = self.proxy
        p.count("cache_hits")
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile, 1 << 16)
        p.count("bytes", size)


# --------------------------------------------------------------------------- cgroups


def _self_cgroups() -> dict[str, str]:
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


def _cgroup_mountpoint(name: str) -> Path:
    return CGROUP_ROOT / name if name else CGROUP_ROOT


class _CgroupSet:
    """One directory per hierarchy for one host (legacy mode only)."""

    def __init__(self, leaf: str) -> None:
        self.leaf = leaf
        self.dirs: list[Path] = []
        for name, path in sorted(_self_cgroups().items()):
            base = _cgroup_mountpoint(name) / path.lstrip("/")
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


def _cgroup_empty(cg: _CgroupSet) -> bool:
    return not cg.pids()


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
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


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if cond():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    return cond()


def _pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- hosts


@dataclasses.dataclass
class BootTiming:
    launched: float = 0.0  #: monotonic time nspawn was started
    ssh_ready: float = 0.0  #: seconds from launch until sshd answered
    system_ready: float = 0.0  #: seconds from launch until is-system-running was running/degraded
    state: str = ""  #: what is-system-running said


class CloudHost:
    """One Debian host: a booted systemd-nspawn container in a given network namespace.

    Created by :meth:`CloudLab.host`; ``start``/``stop``/``reboot`` may be
    called repeatedly.  The root file system (an overlay on the suite's image,
    or a full copy) lives as long as the host object, so a reboot keeps every
    change made by provisioning.
    """

    def __init__(self, lab: CloudLab, name: str, netns: str, suite: str, hostname: str) -> None:
        self.lab = lab
        self.name = name
        self.netns = netns
        self.suite = suite
        self.hostname = hostname
        self.machine = f"{lab.prefix}-{name}"
        self.dir = lab.workdir / "hosts" / name
        self.root = self.dir / "root"
        self.console_log = self.dir / "console.log"
        self.known_hosts = self.dir / "known_hosts"
        self.overlay = False
        self.timing = BootTiming()
        self.boots = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._leader: int | None = None
        self._cgroups: _CgroupSet | None = None
        self._mem_lock = threading.Lock()
        self._peak_cgroup = 0
        self._peak_anon = 0
        self._prepared = False

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<CloudHost {self.name} debian-{self.suite} netns={self.netns} {state}>"

    # ---- preparation

    def _prepare(self) -> None:
        """Root file system + per-host identity (idempotent; teardown waits for it)."""
        with self.lab._operation():
            if not self._prepared:
                self._prepare_root()

    def _prepare_root(self) -> None:
        image = self.lab.image(self.suite)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        if self.lab.use_overlay:
            lower = self.lab._lower(self.suite)
            upper, work = self.dir / "upper", self.dir / "work"
            upper.mkdir(exist_ok=True)
            work.mkdir(exist_ok=True)
            r = subprocess.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(self.root),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode == 0:
                self.overlay = True
            else:
                self.lab.log(
                    f"{self.name}: overlay mount failed ({r.stderr.strip()}); using a full copy"
                )
                self.lab.use_overlay = False
        if not self.overlay:
            extract(image.tarball, self.root, cancel=self.lab._cancel)
        self._personalize()
        self._prepared = True

    def _personalize(self) -> None:
        r = self.root
        (r / "etc/hostname").write_text(self.hostname + "\n")
        hosts = (r / "etc/hosts").read_text() if (r / "etc/hosts").exists() else ""
        hosts = "\n".join(ln for ln in hosts.splitlines() if not ln.startswith("127.0.1.1"))
        (r / "etc/hosts").write_text(
            (hosts.strip() or "127.0.0.1\tlocalhost") + f"\n127.0.1.1\t{self.hostname}\n"
        )
        (r / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        resolv = r / "etc/resolv.conf"
        if resolv.is_symlink():
            resolv.unlink()
        resolv.write_text(
            "# hcloud-ha-web lab host: no DNS here; apt reaches the Debian mirror\n"
            f"# through the lab's proxy at {PROXY_ADDR[0]}:{PROXY_ADDR[1]}\n"
        )
        (r / "etc/apt/apt.conf.d/00hcloud-ha-web-lab-proxy").write_text(
            f'Acquire::http::Proxy "http://{PROXY_ADDR[0]}:{PROXY_ADDR[1]}/";\n'
        )
        ssh_dir = r / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        auth = ssh_dir / "authorized_keys"
        auth.write_text(self.lab.public_key + "\n")
        os.chmod(auth, 0o600)
        # Own SSH host keys, known to us in advance: strict host key checking.
        for kind in ("ed25519", "ecdsa", "rsa"):
            key = r / f"etc/ssh/ssh_host_{kind}_key"
            if not key.exists():
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        kind,
                        "-N",
                        "",
                        "-C",
                        f"root@{self.hostname}",
                        "-f",
                        str(key),
                    ],
                    check=True,
                    timeout=60,
                    capture_output=True,
                )
        pub = (r / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()
        self.known_hosts.write_text(f"{self.machine} {pub[0]} {pub[1]}\n")

    # ---- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def leader_pid(self) -> int | None:
        """PID (in our PID namespace) of the container's systemd."""
        return self._leader

    def start(self, wait: bool = True, timeout: float = BOOT_TIMEOUT) -> BootTiming:
        """Launch the container; with ``wait`` also :meth:`wait_ready`."""
        if self.running:
            raise CloudError(f"{self.name} is already running")
        with self.lab._operation():  # teardown waits until the launch is complete
            self._launch()
        if wait:
            self.wait_ready(timeout)
        return self.timing

    def _launch(self) -> None:
        self._prepare()
        self.lab.proxy.listen(self.netns)
        self._cleanup_nspawn_leftovers()
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="network", SYSTEMD_LOG_COLOR="0")
        if (CGROUP_ROOT / "unified").is_dir():  # hybrid host: give the container a pure cgroup v2
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        nspawn = [
            _which("systemd-nspawn") or "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.machine}",
            f"--hostname={self.hostname}",
            f"--network-namespace-path={NETNS_DIR / self.netns}",
            "--capability=CAP_NET_ADMIN",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
            "--console=read-only",
        ]
        if self.lab.nspawn_features.get("suppress-sync"):
            # dpkg's fsyncs are the slowest part of apt in a lab
            nspawn.append("--suppress-sync=yes")
        if self.lab.mode == "legacy":
            nspawn += ["--register=no", "--keep-unit"]
            self._cgroups = _CgroupSet(self.machine)
            procs = self._cgroups.create()
            argv = [
                "/bin/sh",
                "-c",
                'while [ "$1" != -- ]; do echo $$ > "$1" || exit 97; shift; done; shift; exec "$@"',
                "sh",
                *map(str, procs),
                "--",
                *nspawn,
            ]
        else:
            argv = nspawn
        self.timing = BootTiming(launched=time.monotonic())
        self.boots += 1
        with open(self.console_log, "ab") as out:
            out.write(f"\n==== boot {self.boots}: {' '.join(argv[-len(nspawn) :])}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._leader = self._find_leader(30.0)
        self.lab._start_sampler()
        self.lab.log(
            f"{self.name}: launched nspawn pid {self._proc.pid} "
            f"(debian {self.suite}, netns {self.netns})"
        )

    def _find_leader(self, timeout: float) -> int:
        assert self._proc is not None
        box: list[int] = []

        def found() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                return True
            # nspawn -> outer child (exits) -> container init, the child in a new PID namespace
            for k in child_pids(self._proc.pid):
                try:
                    if os.readlink(f"/proc/{k}/ns/pid") != os.readlink(
                        f"/proc/{self._proc.pid}/ns/pid"
                    ):
                        box.append(k)
                        return True
                except OSError:
                    continue
            return False

        _wait_until(found, timeout, 0.05)
        if not box:
            raise CloudError(f"{self.name}: container init did not appear\n{self.console_tail()}")
        return box[0]

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> BootTiming:
        """Bounded wait: sshd answers and ``systemctl is-system-running`` is running/degraded."""
        if self._proc is None:
            raise CloudError(f"{self.name} was not started")
        deadline = self.timing.launched + timeout
        if self._leader is None or not _pid_alive(self._leader):
            self._leader = self._find_leader(min(30.0, timeout))
        last = ""
        for _attempt in range(int(timeout / 0.3) + 2):
            if not self.running:
                raise CloudError(
                    f"{self.name}: systemd-nspawn exited with {self._proc.returncode}\n"
                    f"{self.console_tail()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r = self.ssh(
                "systemctl is-system-running",
                timeout=min(15.0, max(left, 1.0)),
                check=False,
                connect_timeout=3,
            )
            if r.returncode != 255:  # ssh itself worked
                if not self.timing.ssh_ready:
                    self.timing.ssh_ready = time.monotonic() - self.timing.launched
                state = r.stdout.strip()
                last = state
                if state in ("running", "degraded"):
                    self.timing.system_ready = time.monotonic() - self.timing.launched
                    self.timing.state = state
                    self.lab.log(
                        f"{self.name}: {state} after {self.timing.system_ready:.1f}s "
                        f"(ssh after {self.timing.ssh_ready:.1f}s)"
                    )
                    return self.timing
                if state in ("maintenance", "stopping"):
                    break
            else:
                lines = r.stderr.strip().splitlines()
                last = lines[-1] if lines else "ssh failed"
            time.sleep(0.3)
        raise CloudError(
            f"{self.name}: not ready within {timeout:.0f}s (last: {last!r})\n{self.console_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Orderly poweroff (SIGTERM to nspawn = SIGRTMIN+3 to the container's systemd),
        then SIGKILL after ``timeout``; removes the host's cgroups and nspawn's runtime dirs.
        The root file system stays (see :meth:`destroy`)."""
        proc = self._proc
        if proc is not None:
            self._sample_memory()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.lab.log(f"{self.name}: no orderly shutdown within {timeout:.0f}s, killing")
                    if self._leader and _pid_alive(self._leader):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self._leader, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
            self._proc = None
        if self._leader and _pid_alive(self._leader):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._leader, signal.SIGKILL)
            _wait_until(lambda: not _pid_alive(self._leader or 0), 10)
        self._leader = None
        if self._cgroups is not None:
            for _ in range(3):
                pids = self._cgroups.pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_until(functools.partial(_cgroup_empty, self._cgroups), 5)
            left = self._cgroups.remove()
            if left:
                self.lab.log(f"{self.name}: cgroups left: {left}")
            self._cgroups = None
        self._cleanup_nspawn_leftovers()

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> BootTiming:
        """Relaunch the container (same root file system, same network namespace)."""
        self.stop()
        return self.start(wait=True, timeout=timeout)

    def destroy(self) -> None:
        """Stop, stop serving the proxy in its netns, unmount and delete the root file system."""
        self.stop()
        self.lab.proxy.unlisten(self.netns)
        if self.overlay or os.path.ismount(self.root):
            for _ in range(5):
                r = subprocess.run(
                    ["umount", str(self.root)], capture_output=True, text=True, timeout=30
                )
                if r.returncode == 0 or not os.path.ismount(self.root):
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True, timeout=30)
            self.overlay = False
        if os.path.ismount(self.root):
            raise CloudError(f"{self.name}: {self.root} is still mounted; not deleting")
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(self.dir)], timeout=300, check=False
        )
        self._prepared = False

    def _cleanup_nspawn_leftovers(self) -> None:
        # On this machine /run is not a tmpfs, and nspawn refuses to rm -rf its own
        # propagation directory there ("Attempted to remove disk file system").
        for d in NSPAWN_RUN_DIRS:
            p = d / self.machine
            if p.exists() and not os.path.ismount(p):
                subprocess.run(
                    ["rm", "-rf", "--one-file-system", "--", str(p)], timeout=30, check=False
                )

    # ---- using the host

    def ssh_argv(
        self,
        command: str | None = None,
        *,
        connect_timeout: float = 5,
        address: str = "127.0.0.1",
    ) -> list[str]:
        """argv that runs ``command`` on the host as root over SSH (from inside its netns)."""
        argv = [
            "nsenter",
            f"--net={NETNS_DIR / self.netns}",
            "--",
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.lab.key_path),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            f"HostKeyAlias={self.machine}",
            "-o",
            f"ConnectTimeout={int(connect_timeout)}",
            "-o",
            "ServerAliveInterval=10",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            "LogLevel=ERROR",
            "--",
            f"root@{address}",
        ]
        if command is not None:
            argv.append(command)
        return argv

    def ssh(
        self,
        cmd: str,
        stdin: str | bytes | None = None,
        timeout: float = SSH_TIMEOUT,
        check: bool = True,
        connect_timeout: float = 5,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (a shell command line) on the host as root; text output.

        ``stdin`` (str or bytes) is fed to the command; ``check`` raises
        :class:`CloudError` with the output on a non-zero exit status.
        """
        data = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            r = subprocess.run(
                self.ssh_argv(cmd, connect_timeout=connect_timeout),
                input=data if data is not None else b"",
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise CloudError(f"{self.name}: ssh {cmd!r} timed out after {timeout:.0f}s") from exc
        res = subprocess.CompletedProcess(
            r.args,
            r.returncode,
            r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
        )
        if check and res.returncode != 0:
            raise CloudError(
                f"{self.name}: ssh {cmd!r} failed (exit {res.returncode})\n"
                f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
            )
        return res

    def console_tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def pids(self) -> list[int]:
        """PIDs (in our namespace) of every process of the container (its PID namespace)."""
        if not self._leader:
            return []
        try:
            target = os.readlink(f"/proc/{self._leader}/ns/pid")
        except OSError:
            return []
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(d / "ns/pid") == target:
                        out.append(int(d.name))
        return out

    def _sample_memory(self) -> None:
        """Fold the current cgroup figures into the per-host peaks (the lab's sampler
        thread calls this every :data:`MEMORY_SAMPLE_INTERVAL` seconds)."""
        m = self._cgroup_memory()
        if "cgroup_anon_bytes" in m:
            anon = m["cgroup_anon_bytes"]
        else:  # no memory controller for this cgroup (e.g. cgroup v2 on a hybrid host)
            anon = sum(_pss_kib(p) for p in self.pids()) * 1024
        with self._mem_lock:
            self._peak_cgroup = max(self._peak_cgroup, m.get("cgroup_peak_bytes", 0))
            self._peak_anon = max(self._peak_anon, anon)

    def memory_peak_bytes(self) -> int:
        """Highest cgroup usage (incl. page cache) seen over all boots of this host."""
        self._sample_memory()
        return self._peak_cgroup

    def anon_peak_bytes(self) -> int:
        """Highest anonymous memory (process RSS without page cache) sampled over all boots.
        Where the host's cgroup has no memory controller: highest PSS sum instead."""
        self._sample_memory()
        return self._peak_anon

    def _cgroup_dir_v2(self) -> Path | None:
        if not self._leader:
            return None
        try:
            text = Path(f"/proc/{self._leader}/cgroup").read_text()
        except OSError:
            return None
        path = next((ln.split(":", 2)[2] for ln in text.splitlines() if ln.startswith("0::")), "")
        d = CGROUP_ROOT / path.lstrip("/")
        # init sits in <machine scope>/[payload/]init.scope: go up to the machine's scope
        for _ in range(len(d.parts)):
            if d == CGROUP_ROOT or (d.name.endswith(".scope") and d.name != "init.scope"):
                break
            d = d.parent
        return d if (d / "memory.current").exists() else None

    def _cgroup_memory(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            mdir = self._cgroups.memory_dir() if self._cgroups else None
            if mdir is not None:  # cgroup v1 memory controller (legacy mode)
                stat = dict(ln.split() for ln in (mdir / "memory.stat").read_text().splitlines())
                out["cgroup_current_bytes"] = int((mdir / "memory.usage_in_bytes").read_text())
                out["cgroup_peak_bytes"] = int((mdir / "memory.max_usage_in_bytes").read_text())
                out["cgroup_anon_bytes"] = int(stat.get("total_rss", stat.get("rss", 0)))
                out["cgroup_cache_bytes"] = int(stat.get("total_cache", stat.get("cache", 0)))
            elif (d := self._cgroup_dir_v2()) is not None:  # systemd mode: the machine's scope
                stat = dict(ln.split() for ln in (d / "memory.stat").read_text().splitlines())
                out["cgroup_current_bytes"] = int((d / "memory.current").read_text())
                if (d / "memory.peak").exists():
                    out["cgroup_peak_bytes"] = int((d / "memory.peak").read_text())
                out["cgroup_anon_bytes"] = int(stat.get("anon", 0))
                out["cgroup_cache_bytes"] = int(stat.get("file", 0))
        return out

    def memory(self) -> dict[str, Any]:
        """Memory of the running host, in bytes.

        * ``rss_sum_bytes`` / ``pss_sum_bytes``: over all processes of the
          container (its PID namespace); RSS counts shared pages once per
          process, PSS shares them out (what ``smem`` shows);
        * ``cgroup_*``: the host's memory cgroup (legacy mode: the v1 memory
          controller; systemd mode: the machine scope's cgroup v2): current
          usage and peak *including page cache*, anonymous memory, page cache;
        * ``anon_peak_bytes``: highest anonymous memory sampled (every 0.5 s)
          over all boots - the closest to "peak memory the host needed".
        """
        pids = self.pids()
        out: dict[str, Any] = {
            "processes": len(pids),
            "rss_sum_bytes": sum(_rss_kib(p) for p in pids) * 1024,
            "pss_sum_bytes": sum(_pss_kib(p) for p in pids) * 1024,
        }
        out.update(self._cgroup_memory())
        out["anon_peak_bytes"] = self.anon_peak_bytes()
        return out

    @property
    def host_key(self) -> str:
        """The host's SSH ed25519 public key (``ssh-ed25519 AAAA...``), e.g. for known_hosts."""
        return " ".join(self.known_hosts.read_text().split()[1:3])


# --------------------------------------------------------------------------- lab

_OPEN: list[CloudLab] = []
_OPEN_LOCK = threading.Lock()


def _close_all_at_exit() -> None:
    with _OPEN_LOCK:
        labs = list(_OPEN)
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as exc:  # pragma: no cover - last resort
            print(f"lab.cloud: teardown at exit of {lab.prefix} failed: {exc}", file=sys.stderr)


atexit.register(_close_all_at_exit)


def parallel(fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """``[fn(x) for x in items]`` in threads; the first exception is re-raised.

    If the caller is interrupted (Ctrl-C, SIGTERM -> :class:`CloudInterrupted`)
    it does not wait for the workers: teardown (which stops the hosts and so
    ends their SSH sessions) can start at once.
    """
    todo = list(items)
    if not todo:
        return []
    pool = ThreadPoolExecutor(max_workers=len(todo))
    try:
        futures = [pool.submit(fn, x) for x in todo]
        results = [f.result() for f in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def _nspawn_features() -> dict[str, bool]:
    try:
        text = subprocess.run(
            ["systemd-nspawn", "--help"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    return {"suppress-sync": "--suppress-sync" in text}


class CloudLab:
    """One run of the local cloud: prefix, SSH key pair, work dir, mirror proxy, hosts.

    A context manager; :meth:`close` (also run on exceptions, SIGINT,
    SIGTERM/SIGHUP in the main thread, and at interpreter exit) stops every
    host, unmounts and deletes every root file system, removes every cgroup
    and the work directory.  The cached rootfs tarballs stay.
    """

    def __init__(
        self,
        *,
        prefix: str | None = None,
        cache_dir: Path | str = DEFAULT_CACHE_DIR,
        mirror: Mirror | None = None,
        apt_cache: bool | None = None,
        log: Log | None = None,
        handle_signals: bool = True,
    ) -> None:
        self.prefix = prefix or new_prefix()
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix must match {PREFIX_RE.pattern}: {self.prefix!r}")
        self.cache_dir = Path(cache_dir)
        self.mirror = mirror or apt_mirror()
        self.mode = detect_mode()
        self.nspawn_features = _nspawn_features()
        self.workdir = WORK_ROOT / self.prefix
        self._log = log or (
            lambda msg: print(f"[cloud {self.prefix}] {msg}", file=sys.stderr, flush=True)
        )
        self.hosts: dict[str, CloudHost] = {}
        self.images: dict[str, RootfsImage] = {}
        self.use_overlay = "overlay" in Path("/proc/filesystems").read_text()
        self._lowers: dict[str, Path] = {}
        self._lower_locks = {s: threading.Lock() for s in ("bookworm", "trixie")}
        self._closed = False
        self._busy = 0
        self._busy_cond = threading.Condition()
        self._sampler_stop = threading.Event()
        #: set at close: cancels rootfs builds/extractions still running in worker threads
        self._cancel = threading.Event()
        self._sampler: threading.Thread | None = None
        self._prev_handlers: dict[int, Any] = {}
        self.workdir.mkdir(parents=True, exist_ok=False)
        with _OPEN_LOCK:
            _OPEN.append(self)
        try:
            if handle_signals:
                self._install_signal_handlers()
            self.key_path = self.workdir / "id_ed25519"
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"hcloud-ha-web-lab-{self.prefix}",
                    "-f",
                    str(self.key_path),
                ],
                check=True,
                timeout=30,
                capture_output=True,
            )
            self.public_key = self.key_path.with_suffix(".pub").read_text().strip()
            if apt_cache is None:
                apt_cache = os.environ.get("HCLOUD_HA_WEB_APT_CACHE", "1") != "0"
            proxy_cache = self.cache_dir / "apt-proxy" if apt_cache else None
            self.proxy = MirrorProxy(self.mirror, proxy_cache, self.workdir / "mirror-proxy.log")
            self.log(
                f"mode={self.mode} workdir={self.workdir} mirror hosts={list(self.mirror.hosts)}"
            )
        except BaseException:
            self.close()
            raise

    def log(self, msg: str) -> None:
        self._log(msg)

    def __enter__(self) -> CloudLab:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        raise CloudInterrupted(
            f"signal {signal.Signals(signum).name}: tearing down the local cloud"
        )

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._prev_handlers.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, prev)
        self._prev_handlers.clear()

    # ---- images and hosts

    def image(self, suite: str) -> RootfsImage:
        """The cached rootfs tarball of ``suite`` (built on first use)."""
        suite = suite_of(suite)
        if suite not in self.images:
            self.images[suite] = ensure_rootfs(
                suite,
                cache_dir=self.cache_dir,
                mirror=self.mirror,
                log=self.log,
                cancel=self._cancel,
            )
        return self.images[suite]

    def _lower(self, suite: str) -> Path:
        """The suite's read-only tree (cached between runs) for overlay mounts."""
        with self._lower_locks[suite]:
            if suite not in self._lowers:
                self.image(suite)
                self._lowers[suite] = ensure_tree(
                    suite,
                    cache_dir=self.cache_dir,
                    mirror=self.mirror,
                    log=self.log,
                    cancel=self._cancel,
                )
            return self._lowers[suite]

    def host(
        self, name: str, netns: str, suite: str = "trixie", *, hostname: str | None = None
    ) -> CloudHost:
        """Declare a host ``name`` (``debian-13``/``trixie`` or ``debian-12``/``bookworm``)
        that will boot inside the existing network namespace ``netns``.  Not started yet."""
        if self._closed:
            raise CloudError("lab is closed")
        if not re.match(r"^[a-z][a-z0-9-]{0,30}$", name):
            raise ValueError(f"host name must be a short lowercase DNS label: {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        if any(h.netns == netns for h in self.hosts.values()):
            raise ValueError(f"network namespace {netns!r} already has a host")
        if not (NETNS_DIR / netns).exists():
            raise CloudError(f"network namespace {netns!r} does not exist")
        h = CloudHost(self, name, netns, suite_of(suite), hostname or name)
        self.hosts[name] = h
        return h

    def boot(self, *hosts: CloudHost, timeout: float = BOOT_TIMEOUT) -> dict[str, BootTiming]:
        """Start several hosts in parallel and wait (bounded) until all are ready."""
        hosts = hosts or tuple(self.hosts.values())
        # prepare (extract, overlay mount, keys) in parallel, launch all, then wait for all
        parallel(lambda h: h._prepare(), hosts)
        for h in hosts:
            h.start(wait=False)
        timings = parallel(lambda h: h.wait_ready(timeout), hosts)
        return {h.name: t for h, t in zip(hosts, timings, strict=True)}

    def _start_sampler(self) -> None:
        if self._sampler is not None:
            return
        self._sampler = threading.Thread(
            target=self._sample_loop, name=f"cloud-mem-{self.prefix}", daemon=True
        )
        self._sampler.start()

    def _sample_loop(self) -> None:
        for _ in range(int(MEMORY_SAMPLER_MAX_SECONDS / MEMORY_SAMPLE_INTERVAL)):
            if self._sampler_stop.wait(MEMORY_SAMPLE_INTERVAL):
                return
            for h in list(self.hosts.values()):
                if h.running:
                    with contextlib.suppress(Exception):
                        h._sample_memory()

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """Marks work (extraction, mounts, launching) that teardown must not race with."""
        with self._busy_cond:
            if self._closed:
                raise CloudError("lab is closed")
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_cond:
                self._busy -= 1
                self._busy_cond.notify_all()

    def close(self) -> None:
        """Tear everything down (idempotent).  Signals arriving meanwhile are held back
        and re-raised afterwards, so a second Ctrl-C cannot cut the teardown short."""
        with self._busy_cond:
            if self._closed:
                return
            self._closed = True
        self._cancel.set()
        held: list[int] = []
        saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ValueError, OSError):
                    saved[sig] = signal.signal(sig, lambda signum, _f: held.append(signum))
        try:
            self._teardown()
        finally:
            for signum, prev in saved.items():
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, prev)
            self._restore_signal_handlers()
            if held:
                if held[0] == signal.SIGINT:
                    raise KeyboardInterrupt
                raise CloudInterrupted(f"signal {signal.Signals(held[0]).name} during teardown")

    def _teardown(self) -> None:
        errors = []
        self._sampler_stop.set()
        if self._sampler is not None:
            self._sampler.join(5)
        with self._busy_cond:  # let in-flight extraction/mount/launch finish (bounded)
            if not self._busy_cond.wait_for(lambda: self._busy == 0, timeout=180):
                errors.append("gave up waiting for in-flight host preparation")
        hosts = list(getattr(self, "hosts", {}).values())
        if hosts:
            with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
                for h, fut in [(h, pool.submit(h.destroy)) for h in hosts]:
                    try:
                        fut.result(timeout=STOP_TIMEOUT + 120)
                    except Exception as exc:  # keep tearing down the rest
                        errors.append(f"{h.name}: {exc}")
        if getattr(self, "proxy", None) is not None:
            self.proxy.close()
        left = [m for m in _mounts() if m.startswith(str(self.workdir) + "/")]
        if left:
            errors.append(f"mounts left: {left}")
        else:
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", str(self.workdir)],
                timeout=300,
                check=False,
            )
        with _OPEN_LOCK:
            if self in _OPEN:
                _OPEN.remove(self)
        if errors:
            raise CloudError("teardown incomplete: " + "; ".join(errors))


# --------------------------------------------------------------------------- leftovers


def _mounts() -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            out.append(line.split()[4].encode().decode("unicode_escape"))
    return out


def leftovers(prefix: str) -> list[str]:
    """Everything a run with ``prefix`` could have left behind (empty list = clean)."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a lab.cloud prefix: {prefix!r}")
    found: list[str] = []
    work = WORK_ROOT / prefix
    if work.exists():
        found.append(f"dir {work}")
    found += [f"mount {m}" for m in _mounts() if m.startswith(str(work) + "/") or m == str(work)]
    for name, path in _self_cgroups().items():
        for base in {_cgroup_mountpoint(name), _cgroup_mountpoint(name) / path.lstrip("/")}:
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
    _wait_until(lambda: not any(_pid_alive(p) for p in sup), min(timeout, STOP_TIMEOUT))
    for pid in sup + [k for ks in kids.values() for k in ks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name, path in _self_cgroups().items():
        for base in {_cgroup_mountpoint(name), _cgroup_mountpoint(name) / path.lstrip("/")}:
            for d in base.glob(f"{prefix}-*"):
                cg = _CgroupSet.__new__(_CgroupSet)
                cg.leaf, cg.dirs = d.name, [d]
                for pid in cg.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_until(functools.partial(_cgroup_empty, cg), 5)
                cg.remove()
    for m in sorted((m for m in _mounts() if m.startswith(str(work) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
    for d in NSPAWN_RUN_DIRS:
        for p in d.glob(f"{prefix}-*"):
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", str(p)], timeout=30, check=False
            )
    if work.exists() and not any(m.startswith(str(work) + "/") for m in _mounts()):
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(work)], timeout=300, check=False
        )
    return leftovers(prefix)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lab.cloud.nspawn", description=__doc__.split("\n")[0]
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
