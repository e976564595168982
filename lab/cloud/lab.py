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

The parts: :mod:`lab.cloud.common` (paths, limits, errors), :mod:`lab.cloud.proxy`
(the mirror proxy), :mod:`lab.cloud.cgroups` (legacy-mode cgroups),
:mod:`lab.cloud.host` (one host and its two launch modes), this module (one run:
prefix, key pair, hosts, teardown) and :mod:`lab.cloud.cleanup` (what a crashed run
left behind).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from lab.cloud.common import (
    BOOT_TIMEOUT,
    MEMORY_SAMPLE_INTERVAL,
    MEMORY_SAMPLER_MAX_SECONDS,
    NETNS_DIR,
    PREFIX_RE,
    STOP_TIMEOUT,
    WORK_ROOT,
    CloudError,
    CloudInterrupted,
    Log,
    detect_mode,
    mounts,
    new_prefix,
)
from lab.cloud.host import BootTiming, CloudHost
from lab.cloud.proxy import MirrorProxy
from lab.cloud.rootfs import (
    DEFAULT_CACHE_DIR,
    Mirror,
    RootfsImage,
    apt_mirror,
    ensure_rootfs,
    ensure_tree,
    suite_of,
)

_T = TypeVar("_T")
_R = TypeVar("_R")

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
        left = [m for m in mounts() if m.startswith(str(self.workdir) + "/")]
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
