"""One real Debian systemd host: ``systemd-nspawn --boot`` inside a given network namespace.

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

import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.cloud.cgroups import CgroupSet, cgroup_empty
from lab.cloud.common import (
    BOOT_TIMEOUT,
    CGROUP_ROOT,
    NETNS_DIR,
    NSPAWN_RUN_DIRS,
    PROXY_ADDR,
    SSH_TIMEOUT,
    STOP_TIMEOUT,
    CloudError,
    pid_alive,
    pss_kib,
    rss_kib,
    wait_until,
    which,
)
from lab.cloud.rootfs import extract
from lab.netns import child_pids

if TYPE_CHECKING:
    from lab.cloud.lab import CloudLab


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
        self._cgroups: CgroupSet | None = None
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
            which("systemd-nspawn") or "systemd-nspawn",
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
            self._cgroups = CgroupSet(self.machine)
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

        wait_until(found, timeout, 0.05)
        if not box:
            raise CloudError(f"{self.name}: container init did not appear\n{self.console_tail()}")
        return box[0]

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> BootTiming:
        """Bounded wait: sshd answers and ``systemctl is-system-running`` is running/degraded."""
        if self._proc is None:
            raise CloudError(f"{self.name} was not started")
        deadline = self.timing.launched + timeout
        if self._leader is None or not pid_alive(self._leader):
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
                    if self._leader and pid_alive(self._leader):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self._leader, signal.SIGKILL)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(10)
            self._proc = None
        if self._leader and pid_alive(self._leader):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._leader, signal.SIGKILL)
            wait_until(lambda: not pid_alive(self._leader or 0), 10)
        self._leader = None
        if self._cgroups is not None:
            for _ in range(3):
                pids = self._cgroups.pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(functools.partial(cgroup_empty, self._cgroups), 5)
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
            anon = sum(pss_kib(p) for p in self.pids()) * 1024
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
            "rss_sum_bytes": sum(rss_kib(p) for p in pids) * 1024,
            "pss_sum_bytes": sum(pss_kib(p) for p in pids) * 1024,
        }
        out.update(self._cgroup_memory())
        out["anon_peak_bytes"] = self.anon_peak_bytes()
        return out

    @property
    def host_key(self) -> str:
        """The host's SSH ed25519 public key (``ssh-ed25519 AAAA...``), e.g. for known_hosts."""
        return " ".join(self.known_hosts.read_text().split()[1:3])
