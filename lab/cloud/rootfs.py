"""Debian root file systems for the local cloud tier (debootstrap, cached as tarballs).

One tarball per suite at ``<cache_dir>/rootfs-<suite>.tar`` (default cache dir
``/var/cache/hcloud-ha-web``), next to a JSON stamp ``rootfs-<suite>.stamp``.
The tarball is reused between runs on the same machine and rebuilt when the
stamp differs from :data:`ROOTFS_VERSION` / the package list / the mirror.

What the image holds (close to a Hetzner Debian image for what our remote
steps touch, without cloud-init):

* ``--variant=minbase`` plus :data:`PACKAGES` (systemd as init, dbus, sshd,
  iproute2, procps for ``sysctl``, curl + ca-certificates for the failover
  script, python3-minimal, ifupdown like Hetzner's Debian images, ...);
* ``/etc/apt/sources.list`` with ``<suite>``, ``<suite>-updates`` and
  ``<suite>-security`` from the mirror this machine's apt uses;
* no SSH host keys, an empty ``/etc/machine-id`` and no dbus machine id
  (every host gets its own at boot time, see :mod:`lab.cloud.host`);
* docs/man pages excluded by dpkg (smaller, faster installs), apt without
  translations, apt's daily timers masked (they would grab the dpkg lock at a
  random moment during a test run; the steps still use apt's lock timeout).

Hosts do not unpack the tarball each: :func:`ensure_tree` keeps one extracted
read-only tree per tarball (``rootfs-<suite>.tree/<key>``) that every host
uses as the ``lowerdir`` of its own overlay (upper = the host's changes), so
hosts are independent and a reboot keeps their changes.

The mirror is never written into the repository: it is read from this
machine's apt sources at run time (:func:`apt_mirror`), or from the
``HCLOUD_HA_WEB_MIRROR`` environment variable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

#: Bump when the way the image is built changes (forces a rebuild everywhere).
ROOTFS_VERSION = "4"

#: Default cache directory (``HCLOUD_HA_WEB_CACHE`` overrides it).
DEFAULT_CACHE_DIR = Path(os.environ.get("HCLOUD_HA_WEB_CACHE", "/var/cache/hcloud-ha-web"))

#: Hetzner image names -> Debian suites.
SUITES = {"debian-12": "bookworm", "debian-13": "trixie"}
SUITE_VERSIONS = {"bookworm": "12", "trixie": "13"}

#: Installed on top of debootstrap's minbase.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "iproute2",
    "iputils-ping",
    "ifupdown",
    "netbase",
    "procps",
    "ca-certificates",
    "curl",
    "python3-minimal",
    "less",
)

#: Upper bound for one debootstrap run (seconds).
DEBOOTSTRAP_TIMEOUT = 1200

Log = Callable[[str], None]


def _nolog(_msg: str) -> None:
    pass


def suite_of(name: str) -> str:
    """``debian-13`` / ``13`` / ``trixie`` -> ``trixie``."""
    if name in SUITE_VERSIONS:
        return name
    if name in SUITES:
        return SUITES[name]
    for suite, version in SUITE_VERSIONS.items():
        if name == version:
            return suite
    raise ValueError(
        f"unknown Debian release {name!r}; use one of {sorted(SUITES) + sorted(SUITE_VERSIONS)}"
    )


# --------------------------------------------------------------------------- mirror


@dataclasses.dataclass(frozen=True)
class Mirror:
    """Where Debian packages come from (as this machine's apt sees it)."""

    url: str  #: e.g. ``http://<host>/debian``
    security_url: str  #: e.g. ``http://<host>/debian-security``

    @property
    def hosts(self) -> tuple[str, ...]:
        """Host names (with ``:port`` when not 80) the lab lets hosts reach."""
        out = []
        for u in (self.url, self.security_url):
            p = urllib.parse.urlsplit(u)
            h = p.hostname or ""
            if p.port and p.port != 80:
                h = f"{h}:{p.port}"
            if h and h not in out:
                out.append(h)
        return tuple(out)


def _apt_source_uris() -> list[str]:
    """All ``deb`` URIs from /etc/apt/sources.list and sources.list.d (both formats)."""
    uris: list[str] = []
    files = ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if (
                    "deb" in fields.get("types", "").split()
                    and fields.get("enabled", "yes") != "no"
                ):
                    uris.extend(fields.get("uris", "").split())
        elif path.endswith(".list"):
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", line)
                if m:
                    uris.append(m.group(1))
    return uris


def apt_mirror() -> Mirror:
    """The Debian mirror of this machine (``HCLOUD_HA_WEB_MIRROR`` overrides it).

    Only plain ``http://`` mirrors are supported (apt verifies signatures; the
    lab's mirror proxy forwards plain HTTP only).
    """
    env = os.environ.get("HCLOUD_HA_WEB_MIRROR")
    if env:
        url = env.rstrip("/")
    else:
        url = ""
        for u in _apt_source_uris():
            u = u.rstrip("/")
            if u.startswith("http://") and u.endswith("/debian"):
                url = u
                break
        if not url:
            raise RuntimeError(
                "no plain-http Debian mirror ending in /debian found in /etc/apt/sources.list*; "
                "set HCLOUD_HA_WEB_MIRROR=http://<mirror>/debian"
            )
    security = url + "-security"
    for u in _apt_source_uris():
        u = u.rstrip("/")
        if u.startswith("http://") and u.endswith("/debian-security"):
            security = u
            break
    return Mirror(url=url, security_url=security)


def mirror_reachable(mirror: Mirror, suite: str = "trixie", timeout: float = 10.0) -> str | None:
    """None when ``<mirror>/dists/<suite>/InRelease`` answers 200, else the reason."""
    import urllib.request

    url = f"{mirror.url}/dists/{suite}/InRelease"
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if resp.status == 200:
                return None
            return f"{url} answered HTTP {resp.status}"
    except Exception as exc:
        return f"{url} unreachable: {exc}"


# --------------------------------------------------------------------------- image


@dataclasses.dataclass(frozen=True)
class RootfsImage:
    """A cached rootfs tarball."""

    suite: str
    tarball: Path
    built: bool  #: True when this call ran debootstrap (cold)
    seconds: float  #: wall time of this call (build or cache check)
    cold_seconds: float | None = None  #: how long the last cold build of this tarball took

    @property
    def size_bytes(self) -> int:
        return self.tarball.stat().st_size


def _stamp(suite: str, mirror: Mirror) -> dict:
    return {
        "version": ROOTFS_VERSION,
        "suite": suite,
        "packages": sorted(PACKAGES),
        "mirror": hashlib.sha256(f"{mirror.url} {mirror.security_url}".encode()).hexdigest()[:16],
    }


def tarball_path(suite: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return Path(cache_dir) / f"rootfs-{suite_of(suite)}.tar"


def ensure_rootfs(
    suite: str,
    *,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    mirror: Mirror | None = None,
    force: bool = False,
    log: Log = _nolog,
    cancel: threading.Event | None = None,
) -> RootfsImage:
    """Return the cached tarball for ``suite``, building it first if needed.

    Safe to call from several processes/threads at once (an flock per suite
    serialises builds of the same suite; different suites build in parallel).
    """
    t0 = time.monotonic()
    suite = suite_of(suite)
    mirror = mirror or apt_mirror()
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tar = cache / f"rootfs-{suite}.tar"
    stamp_file = cache / f"rootfs-{suite}.stamp"
    want = _stamp(suite, mirror)
    with open(cache / f"rootfs-{suite}.lock", "w") as lockf:
        _flock(lockf, timeout=DEBOOTSTRAP_TIMEOUT + 120, cancel=cancel)
        if not force and tar.is_file():
            try:
                have = json.loads(stamp_file.read_text())
            except (OSError, ValueError):
                have = None
            if have == want:
                return RootfsImage(
                    suite, tar, False, time.monotonic() - t0, _cold_seconds(cache, suite)
                )
            log(f"rootfs {suite}: stamp changed ({have} -> {want}), rebuilding")
        _build(suite, mirror, tar, cache, log, cancel)
        seconds = time.monotonic() - t0
        (cache / f"rootfs-{suite}.info.json").write_text(
            json.dumps({"build_seconds": round(seconds, 1), "built_at": time.time()}) + "\n"
        )
        tmp = stamp_file.with_suffix(".stamp.tmp")
        tmp.write_text(json.dumps(want, indent=1) + "\n")
        os.replace(tmp, stamp_file)
    return RootfsImage(suite, tar, True, seconds, seconds)


def _cold_seconds(cache: Path, suite: str) -> float | None:
    try:
        return float(json.loads((cache / f"rootfs-{suite}.info.json").read_text())["build_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flock(f: IO[str], timeout: float, cancel: threading.Event | None = None) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.5) + 1):
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if cancel is not None and cancel.is_set():
                raise BuildCancelled(f"cancelled while waiting for {f.name}") from None
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    raise TimeoutError(f"could not lock {f.name} within {timeout:.0f}s")


def _build(
    suite: str,
    mirror: Mirror,
    tar: Path,
    cache: Path,
    log: Log,
    cancel: threading.Event | None = None,
) -> None:
    for tool in ("debootstrap", "tar"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is not installed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix=f".build-{suite}-", dir=cache))
    root = work / "root"
    tmp_tar = cache / f".rootfs-{suite}.tar.tmp"
    try:
        cmd = [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            suite,
            str(root),
            mirror.url,
        ]
        log(f"rootfs {suite}: {' '.join(cmd)}")
        with open(work / "debootstrap.log", "wb") as out:
            rc = _run_group(cmd, out, DEBOOTSTRAP_TIMEOUT, cancel)
        if rc != 0:
            tail = (work / "debootstrap.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"debootstrap {suite} failed (rc={rc}):\n{tail}")
        _customize(root, suite, mirror)
        cmd = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
        rc = _run_group([*cmd, "-C", str(root), "-cf", str(tmp_tar), "."], None, 600, cancel)
        if rc != 0:
            raise RuntimeError(f"tar -cf {tmp_tar} failed (exit {rc})")
        os.replace(tmp_tar, tar)
        log(f"rootfs {suite}: wrote {tar} ({tar.stat().st_size // (1 << 20)} MiB)")
    finally:
        tmp_tar.unlink(missing_ok=True)
        _rm_tree(work)


class BuildCancelled(RuntimeError):
    """A build or extraction was cancelled (the caller is tearing down)."""


def _run_group(
    cmd: list[str],
    out: IO[bytes] | None,
    timeout: float,
    cancel: threading.Event | None = None,
) -> int:
    """Run ``cmd`` in its own process group and return its exit status.

    On timeout, on ``cancel`` being set, or when the calling thread is
    interrupted, the whole group (debootstrap's chrooted dpkg children too) is
    killed by its id before the exception propagates.  ``out=None``: stdout is
    discarded, stderr inherited.
    """
    proc = subprocess.Popen(
        cmd,
        stdout=out if out is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if out is not None else None,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        for _ in range(int(timeout / 0.25) + 2):
            try:
                return proc.wait(0.25)
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                raise BuildCancelled(f"cancelled: {' '.join(cmd[:3])} ...")
            if time.monotonic() > deadline:
                break
        raise subprocess.TimeoutExpired(cmd, timeout)
    except BaseException:
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(5)
            break
        except subprocess.TimeoutExpired:
            continue
    for _ in range(50):  # members of the group may outlive its leader for a moment
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.1)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


def _customize(root: Path, suite: str, mirror: Mirror) -> None:
    """Turn a fresh debootstrap tree into a generic host image (no per-host data)."""
    _write(
        root / "etc/apt/sources.list",
        f"deb {mirror.url} {suite} main\n"
        f"deb {mirror.url} {suite}-updates main\n"
        f"deb {mirror.security_url} {suite}-security main\n",
    )
    _write(root / "etc/apt/apt.conf.d/90hcloud-ha-web-lab", 'Acquire::Languages "none";\n')
    _write(
        root / "etc/dpkg/dpkg.cfg.d/90hcloud-ha-web-lab-nodoc",
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n"
        "path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n"
        "path-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n",
    )
    _write(
        root / "etc/ssh/sshd_config.d/90-hcloud-ha-web-lab.conf",
        "# hcloud-ha-web lab host: root by key only, as on a Hetzner server with an SSH key\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\n",
    )
    # Per-host identity is created at host preparation/boot time.
    for key in glob.glob(str(root / "etc/ssh/ssh_host_*")):
        os.unlink(key)
    _write(root / "etc/machine-id", "")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / "var/lib/dbus/machine-id")
    _write(root / "etc/hostname", "localhost\n")
    # Units that only disturb a container: apt timers take the dpkg lock at random
    # times; a getty on the console only costs memory.
    systemd = root / "etc/systemd/system"
    for unit in (
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "console-getty.service",
        "getty@tty1.service",
        "e2scrub_reap.service",
        "e2scrub_all.timer",
    ):
        link = systemd / unit
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("/dev/null")
    wants = systemd / "getty.target.wants/getty@tty1.service"
    if wants.is_symlink():
        wants.unlink()
    # Drop downloaded packages (a fresh cloud image has an empty cache too).
    for deb in glob.glob(str(root / "var/cache/apt/archives/*.deb")):
        os.unlink(deb)


def extract(
    tarball: Path | str,
    dest: Path | str,
    timeout: float = 600,
    cancel: threading.Event | None = None,
) -> None:
    """Unpack a rootfs tarball into ``dest`` (created; must be empty or absent)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
    rc = _run_group([*cmd, "-C", str(dest), "-xf", str(tarball)], None, timeout, cancel)
    if rc != 0:
        raise RuntimeError(f"tar -xf {tarball} into {dest} failed (exit {rc})")


def ensure_tree(
    suite: str,
    *,
    cache_dir: Path | str = DEFAULT_CACHE_DIR,
    mirror: Mirror | None = None,
    log: Log = _nolog,
    cancel: threading.Event | None = None,
) -> Path:
    """A read-only extracted copy of the suite's tarball, for overlay ``lowerdir``.

    Cached next to the tarball (``rootfs-<suite>.tree/<key>``, key = tarball
    size and mtime), so a run does not unpack 250 MB per suite.  Overlay
    mounts never write to it.  Trees of older tarballs are removed unless an
    overlay still uses them.
    """
    suite = suite_of(suite)
    img = ensure_rootfs(suite, cache_dir=cache_dir, mirror=mirror, log=log, cancel=cancel)
    st = img.tarball.stat()
    key = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    trees = Path(cache_dir) / f"rootfs-{suite}.tree"
    tree, done = trees / key, trees / f"{key}.complete"
    trees.mkdir(parents=True, exist_ok=True)
    with open(Path(cache_dir) / f"rootfs-{suite}.tree.lock", "w") as lockf:
        _flock(lockf, timeout=600, cancel=cancel)
        if not done.exists():
            _rm_tree(tree)  # a partial extraction from an interrupted run
            t0 = time.monotonic()
            extract(img.tarball, tree, cancel=cancel)
            done.touch()
            log(f"rootfs {suite}: extracted {img.tarball.name} in {time.monotonic() - t0:.1f}s")
        in_use = _overlay_lowerdirs()
        for other in trees.iterdir():
            base = other.name.removesuffix(".complete")
            if base != key and not any(u.startswith(str(trees / base)) for u in in_use):
                if other.is_dir():
                    _rm_tree(other)
                else:
                    other.unlink(missing_ok=True)
    return tree


def _overlay_lowerdirs() -> list[str]:
    """lowerdir paths of every overlay mount visible to this process."""
    out: list[str] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        _, _, sep = line.partition(" - ")
        fields = sep.split()
        if len(fields) >= 3 and fields[0] == "overlay":
            for opt in fields[2].split(","):
                if opt.startswith("lowerdir="):
                    out.extend(opt[len("lowerdir=") :].split(":"))
    return out


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    out: list[str] = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        mnt = line.split()[4].encode().decode("unicode_escape")
        if mnt.startswith(prefix):
            out.append(mnt)
    return out


def _rm_tree(path: Path) -> None:
    """Unmount what is mounted below ``path`` (an interrupted debootstrap leaves
    /proc and /sys mounted in its target), then ``rm -rf --one-file-system``."""
    for _ in range(3):
        mounts = sorted(_mounts_under(path), key=len, reverse=True)
        if not mounts:
            break
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=30, check=False)
    if _mounts_under(path):
        raise RuntimeError(f"still mounted below {path}; not deleting it")
    if path.exists():
        subprocess.run(
            ["rm", "-rf", "--one-file-system", "--", str(path)], check=False, timeout=600
        )


def build_all(suites: Iterable[str] = ("trixie", "bookworm"), **kw: Any) -> list[RootfsImage]:
    """Build/check several suites in parallel threads (debootstrap is I/O bound).

    If the caller is interrupted (Ctrl-C, SIGTERM handler raising), the builds
    in the worker threads are cancelled and cleaned up before it re-raises.
    """
    from concurrent.futures import ThreadPoolExecutor

    todo = list(suites)
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=len(todo) or 1)
    try:
        futures = [pool.submit(ensure_rootfs, s, cancel=cancel, **kw) for s in todo]
        return [f.result() for f in futures]
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True)  # cancelled builds kill their processes within a second


if __name__ == "__main__":  # python -m lab.cloud.rootfs [suite...]
    import sys

    for img in build_all(sys.argv[1:] or ("trixie", "bookworm"), log=print):
        print(
            json.dumps(
                {
                    "metric": "cloud.rootfs",
                    "suite": img.suite,
                    "built": img.built,
                    "seconds": round(img.seconds, 2),
                    "tarball": str(img.tarball),
                }
            )
        )
