"""The whole HA cluster on a :class:`lab.topology.LabNetwork`, with the files the program renders.

``LabCluster(lab).start()`` renders every host through ``components.render.render_host``
(the same code Pulumi ships), writes the files under a per-host root below
``/run/<prefix>-lab/<host>`` (root-owned 0755: keepalived's ``enable_script_security``
refuses scripts below world-writable directories such as /tmp), validates them with
each daemon's own checker (``validate_command``), starts the fake Hetzner API and then
the daemons in the host namespaces, as children of this process tracked by PID:

* web hosts: Apache (a copy of /etc/apache2 under the host root, the rendered site);
* LBs: the interface facts script, the rendered sysctl, HAProxy (``-Ws``, so a
  SIGUSR2 reloads it like ``systemctl reload``) and keepalived (foreground, own pid
  files).

Failures for the scenarios: :meth:`kill_haproxy` / :meth:`start_haproxy`,
:meth:`kill_apache` / :meth:`start_apache`, :meth:`vanish` / :meth:`return_host`
(all processes SIGKILLed and every link down, then back), :meth:`partition_lbs` /
:meth:`heal_lbs` (split brain).  Every wait is bounded (:func:`wait_for`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from components.config import Settings
from components.render import (
    APACHE_MODULES,
    CERT_SCRIPT,
    CERT_STATE_FILE,
    HAPROXY_DOWN_FILE,
    HAPROXY_WATCH,
    STATS_LOCAL_PORT,
    TLS_CERT,
    ClusterFacts,
    Layout,
    RenderedFile,
    RenderSecrets,
    daemons_for,
    interface_facts_script,
    render_host,
    validate_command,
)
from components.site import DOCROOT, PLACEHOLDER
from lab import topology as topo
from lab.acme import PebbleCA, launch_acme
from lab.fake_hcloud import FakeApi, launch
from lab.netns import Host, LabError, child_pids
from lab.topology import LabNetwork
from lab.traffic import fetch

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_BASE = Path("/run")
#: The lab talks to the stats page with this user (Settings default).
STATS_URL_PATH = "/haproxy?stats"
#: A locally administered MAC no lab interface has (split brain, see partition_lbs).
BLACKHOLE_MAC = "02:00:5e:ff:ff:01"
#: Directories the packages create on a real host (node exporter's textfile, LB state).
_OPS_DIRS = ("var/lib/prometheus/node-exporter", "var/lib/hcloud-ha-web")


def wait_for(
    cond: Callable[[], T],
    timeout: float,
    what: str,
    step: float = 0.05,
) -> T:
    """Poll ``cond`` until it returns something truthy; bounded in time and count."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / step) + 2):
        try:
            last = cond()
        except (OSError, LabError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[no-any-return]
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _lab_ssh_key() -> str:
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} lab@hcloud-ha-web"


def lab_settings(web_count: int, api_url: str, **overrides: Any) -> Settings:
    """Settings matching the lab topology (addresses, API endpoint); overrides win.

    The lab-only path: `lab=True` lets Settings take the fake API's plain-HTTP URL and
    the 198.18.0.0/15 addresses, which stack config (`load_settings`) never accepts.
    """
    values: dict[str, Any] = {
        "lab": True,
        # The smallest type (2 GiB): HAProxy's maxconn 8192 needs ~16400 descriptors,
        # within this machine's hard limit (20000); a real cx23 would ask for 32800.
        "server_type": "cpx11",
        "ssh_public_key": _lab_ssh_key(),
        "admin_cidrs": ("198.18.0.0/15",),
        "network_cidr": "198.18.0.0/16",
        "subnet_cidr": topo.PRIVATE_SUBNET,
        "lb_private_ips": tuple(topo.LB_PRIVATE_IPS[n] for n in topo.LB_NAMES),
        "web_private_ips": tuple(topo.web_private_ip(k) for k in range(1, web_count + 1)),
        "web_count": web_count,
        "hetzner_api_endpoint": api_url,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class HostRuntime:
    """What runs on one lab host and where its files live."""

    host: Host
    root: Path
    layout: Layout
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)


def _gone(pids: set[int], parent: int) -> bool:
    """None of ``pids`` is a child of ``parent`` any more."""
    return not pids & set(child_pids(parent))


def assign_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The floating IP assign requests among the fake API's ``calls``."""
    return [x for x in calls if x["method"] == "POST" and x["path"].endswith("/actions/assign")]


class ClusterView:
    """What the scenarios observe of a running cluster, whatever runs its daemons.

    `LabCluster` runs the daemons as processes of this process; the local cloud's
    `CloudCluster` has systemd run them on booted Debian hosts. Both sit on a
    `LabNetwork` (``lab``) with the fake Hetzner API (``api``), and supply
    `running`, `haproxy_command`, `daemon_log` and `failover_log`.
    """

    lab: LabNetwork
    api: FakeApi | None
    settings: Settings | None
    stats_password: str

    def running(self, name: str, daemon: str) -> bool:
        raise NotImplementedError

    def haproxy_command(self, name: str, command: str, timeout: float = 2.0) -> str:
        """One command on HAProxy's runtime API (the stats socket) of ``name``."""
        raise NotImplementedError

    def daemon_log(self, name: str, daemon: str) -> str:
        raise NotImplementedError

    def failover_log(self, name: str) -> str:
        raise NotImplementedError

    # -- observation ---------------------------------------------------------------
    def is_master(self, name: str) -> bool:
        """keepalived marks mastership with the floating IP on ``lo`` (scope host)."""
        out = self.lab[name].ip("-4", "-o", "addr", "show", "dev", "lo", check=False)
        return f" {topo.FLOATING_IP}/32 " in out

    def masters(self) -> list[str]:
        return [n for n in topo.LB_NAMES if self.is_master(n)]

    def haproxy_healthy(self, name: str) -> bool:
        """HAProxy's local health endpoint answers (what keepalived's vrrp_script checks)."""
        proc = self.lab[name].run(
            [
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "--max-time",
                "0.5",
                "http://127.0.0.1:8405/healthz",
            ],
            check=False,
        )
        return proc.returncode == 0

    def server_status(self, name: str) -> dict[str, str]:
        """``{web1: "UP", web2: "DOWN", ...}`` for backend ``web`` of HAProxy on ``name``."""
        out = self.haproxy_command(name, "show stat")
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if not lines or not lines[0].startswith("# "):
            raise LabError(f"unexpected 'show stat' output: {out[:200]!r}")
        header = lines[0][2:].split(",")
        status: dict[str, str] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "web" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                status[row["svname"]] = row.get("status", "")
        return status

    def backends_up(self, name: str) -> bool:
        st = self.server_status(name)
        return bool(st) and all(s.startswith("UP") for s in st.values())

    def assigned(self) -> str | None:
        assert self.api is not None
        name = self.api.client.state().get("assigned_name")
        return None if name is None else str(name)

    def wait_settled(self, timeout: float = 15.0) -> None:
        """lb1 is the only master, owns the IP at the API and the client route; all webs UP."""

        def settled() -> bool:
            return (
                self.masters() == ["lb1"]
                and self.assigned() == "lb1"
                and self.lab.floating_ip_target() == "lb1"
                and all(self.backends_up(n) for n in topo.LB_NAMES if self.running(n, "haproxy"))
            )

        try:
            wait_for(settled, timeout, "cluster settled: lb1 sole master with the IP, webs UP")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.describe()}") from None

    def describe(self) -> str:
        """Current state, for error messages: masters, API owner, route, backends, logs."""
        lines = [
            f"masters={self.masters()} api={self.assigned()} route={self.lab.floating_ip_target()}"
        ]
        for name in topo.LB_NAMES:
            running = {d: self.running(name, d) for d in ("haproxy", "keepalived")}
            try:
                backends: Any = self.server_status(name)
            except (OSError, LabError) as exc:
                backends = exc
            lines.append(f"{name}: running={running} backends={backends}")
            tail = self.daemon_log(name, "keepalived").splitlines()[-12:]
            lines += [f"  {name} keepalived: {ln}" for ln in tail]
            lines += [
                f"  {name} failover: {ln}" for ln in self.failover_log(name).splitlines()[-5:]
            ]
        return "\n".join(lines)

    def vrrp_transitions(self, name: str, state: str = "MASTER") -> int:
        """How often keepalived on ``name`` logged entering ``state`` (all its runs)."""
        return self.daemon_log(name, "keepalived").count(f"Entering {state} STATE")

    @property
    def url(self) -> str:
        return f"http://{topo.FLOATING_IP}/"

    @property
    def stats_url(self) -> str:
        """Where the stats page is: HTTPS on the primary domain, or each LB's localhost."""
        if self.domains:
            return f"https://{self.domains[0]}{STATS_URL_PATH}"
        return f"http://127.0.0.1:{STATS_LOCAL_PORT}{STATS_URL_PATH}"

    # -- HTTPS ---------------------------------------------------------------------
    @property
    def domains(self) -> tuple[str, ...]:
        return self.settings.domains if self.settings is not None else ()

    @property
    def https_url(self) -> str:
        return f"https://{self.domains[0]}/"

    @property
    def issuing_root(self) -> str:
        """The CA file a client verifies the site's certificate against."""
        raise NotImplementedError

    def tls_stream_args(self) -> dict[str, Any]:
        """`TrafficStream` / `fetch` arguments for HTTPS through the floating IP."""
        return {"connect_to": topo.FLOATING_IP, "cafile": self.issuing_root}

    def cert_command(
        self, name: str, *args: str, check: bool = True, timeout: float = 150
    ) -> subprocess.CompletedProcess[str]:
        """``hcloud-ha-web-cert ARGS`` on LB ``name`` (what the systemd timer runs)."""
        raise NotImplementedError

    def tls_cert_path(self, name: str) -> str:
        raise NotImplementedError

    def served_cert(self, name: str) -> dict[str, str]:
        """What HAProxy on ``name`` serves right now (runtime API ``show ssl cert``)."""
        out = self.haproxy_command(name, f"show ssl cert {self.tls_cert_path(name)}")
        fields = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    @property
    def stats_user(self) -> str:
        assert self.settings is not None
        return self.settings.stats_user

    def get(self, url: str | None = None, **kw: Any) -> dict[str, Any]:
        """One request from the client host (`lab.traffic.fetch`), to the site by default."""
        result: dict[str, Any] = self.lab.client.call(fetch, url or self.url, **kw)
        return result

    def api_calls(self, since: float) -> list[dict[str, Any]]:
        """The fake API's call log since ``since`` (epoch seconds)."""
        assert self.api is not None
        return [x for x in self.api.client.calls() if x["ts"] >= since]

    def route_moves(self, since: float) -> list[float]:
        """When the fake API moved the floating IP's route since ``since`` (epoch s)."""
        return [
            float(x["ts"])
            for x in self.api_calls(since)
            if x.get("method") == "ROUTE" and x.get("status") == 0
        ]

    def wait_owner(self, lb: str, timeout: float = 10.0) -> None:
        """The API shows the IP assigned to ``lb`` and the client's route points there."""
        wait_for(
            lambda: self.assigned() == lb and self.lab.floating_ip_target() == lb,
            timeout,
            f"floating IP assigned and routed to {lb}",
        )


class LabCluster(ClusterView):
    """The daemons of the cluster on a running ``LabNetwork``; :meth:`stop` ends them."""

    def __init__(
        self, lab: LabNetwork, *, alert_webhook_url: str = "", **settings_overrides: Any
    ) -> None:
        self.lab = lab
        self.alert_webhook_url = alert_webhook_url
        self.settings_overrides = settings_overrides
        self.base = RUN_BASE / f"{lab.prefix}-lab"
        self.api: FakeApi | None = None
        self.settings: Settings | None = None
        # Blanks, '#', a quote and ':' on purpose: haproxy.cfg must carry them whole.
        self.stats_password = f"lab stats #{secrets.token_hex(4)} it's:ok"
        self.secrets: RenderSecrets | None = None
        self.acme: PebbleCA | None = None
        self.hosts: dict[str, HostRuntime] = {}
        self.facts = ClusterFacts(
            floating_ip=topo.FLOATING_IP,
            floating_ip_id=topo.FLOATING_IP_ID,
            server_ids={
                **topo.LB_SERVER_IDS,
                **{topo.web_name(k): topo.web_server_id(k) for k in range(1, lab.web_count + 1)},
            },
        )

    # -- lifecycle -------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> LabCluster:
        self.base.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.api = launch(self.lab)
        if self.settings_overrides.get("domains"):
            # HTTPS: Let's Encrypt's test CA on the public side; the LBs ask it, not LE.
            self.acme = launch_acme(self.lab)
            self.settings_overrides.setdefault("acme_directory", self.acme.directory_url)
            self.settings_overrides.setdefault("acme_email", "lab@hcloud-ha-web.example")
        self.settings = lab_settings(self.lab.web_count, self.api.url, **self.settings_overrides)
        self.secrets = RenderSecrets(
            stats_password=self.stats_password,
            vrrp_password="lab-vrrp",
            failover_token=self.api.token,
            acme_account_seed=base64.b64encode(secrets.token_bytes(32)).decode(),
            alert_webhook_url=self.alert_webhook_url,
        )
        for host in [*self.lab.lbs, *self.lab.webs]:
            root = self.base / host.name
            root.mkdir(mode=0o755, exist_ok=True)
            layout = Layout(
                root=str(root),
                haproxy_log_target="stdout",
                haproxy_unit="",  # no supervisor restarts the lab's HAProxy
                failover_log_file=str(root / "var/log/hcloud-floating-ip.log"),
                acme_ca_bundle=str(self.acme.api_ca) if self.acme else "",
                haproxy_reload_command="",  # the lab hot-loads through the runtime API only
                systemd=False,
                ops_log_file=str(root / "var/log/hcloud-ha-web-ops.log"),
            )
            self.hosts[host.name] = HostRuntime(host, root, layout)
        for web in self.lab.webs:
            self._install_web(web.name)
            self.start_apache(web.name)
        for lb in self.lab.lbs:
            self._install_lb(lb.name)
        for host in [*self.lab.lbs, *self.lab.webs]:
            self.start_node_exporter(host.name)
        for host in [*self.lab.lbs, *self.lab.webs]:
            self.wait_node_exporter(host.name)
        self.start_lb("lb1")
        wait_for(lambda: self.is_master("lb1"), timeout, "lb1 to become VRRP master")
        self.start_lb("lb2")
        self.wait_settled(timeout)
        if self.acme is not None:
            for lb_name in topo.LB_NAMES:  # what the acme step's `activate` does on a host
                out = self.cert_command(lb_name, "activate")
                if self.cert_command(lb_name, "status", check=False).returncode != 0:
                    raise LabError(
                        f"{lb_name}: no certificate from Pebble:\n{out.stdout}"
                        f"{out.stderr}\n{self.acme.log()[-3000:]}"
                    )
        return self

    # -- HTTPS ---------------------------------------------------------------------
    def cert_command(
        self, name: str, *args: str, check: bool = True, timeout: float = 150
    ) -> subprocess.CompletedProcess[str]:
        """``hcloud-ha-web-cert ARGS`` on LB ``name`` (what the systemd timer runs)."""
        rt = self.hosts[name]
        script = str(rt.root / CERT_SCRIPT.lstrip("/"))
        proc = rt.host.run(["python3", script, *args], check=False, timeout=timeout)
        with (rt.host.logdir / f"{name}-cert.log").open("a") as log:
            log.write(f"$ hcloud-ha-web-cert {' '.join(args)} -> {proc.returncode}\n")
            log.write(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise LabError(
                f"{name}: hcloud-ha-web-cert {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def tls_cert_path(self, name: str) -> str:
        return str(self.hosts[name].root) + TLS_CERT

    @property
    def issuing_root(self) -> str:
        assert self.acme is not None, "no ACME CA in this lab (no domains)"
        return str(self.acme.issuing_root)

    def cert_state(self, name: str) -> dict[str, Any]:
        path = self.hosts[name].root / CERT_STATE_FILE.lstrip("/")
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        """Stop every daemon by PID and remove the host roots (the lab removes the rest)."""
        for rt in self.hosts.values():
            for name in list(rt.procs):
                self._stop(rt, name, signal.SIGTERM)
        if self.api is not None:
            self.lab.api.kill(self.api.proc)
        if self.acme is not None:
            self.acme.stop()
        if self.base.is_dir() and self.base.parent == RUN_BASE:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LabCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- rendering -------------------------------------------------------------
    def rendered(self, name: str) -> tuple[RenderedFile, ...]:
        assert self.settings is not None and self.secrets is not None
        return render_host(self.settings, self.facts, self.secrets, name, self.hosts[name].layout)

    def _write(self, files: tuple[RenderedFile, ...]) -> None:
        for f in files:
            path = Path(f.path)
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".lab-new")
            tmp.write_text(f.content, encoding="utf-8")
            tmp.chmod(int(f.mode, 8))
            os.replace(tmp, path)

    def _validate(self, name: str, role: str) -> None:
        rt = self.hosts[name]
        for daemon in daemons_for(role):  # type: ignore[arg-type]
            cmd = validate_command(daemon, rt.layout)
            proc = rt.host.run(
                ["sh", "-ec", cmd], check=False, timeout=20, env={**os.environ, "STAGE": ""}
            )
            if proc.returncode != 0:
                raise LabError(
                    f"{name}: {daemon.name} config rejected by its checker:\n"
                    f"{proc.stdout}{proc.stderr}"
                )

    def _install_web(self, name: str) -> None:
        rt = self.hosts[name]
        conf = rt.root / "etc/apache2"
        if not conf.exists():
            conf.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            shutil.copytree("/etc/apache2", conf, symlinks=True)
        self._write(self.rendered(name))
        # The placeholder page is the live release, as the site step makes it on a host.
        current = Path(f"{rt.layout.root.rstrip('/')}{DOCROOT}/current")
        if not current.is_symlink():
            current.symlink_to(PLACEHOLDER)
        for mod in APACHE_MODULES:
            link = conf / "mods-enabled" / f"{mod}.load"
            if not link.is_symlink():
                link.symlink_to(f"../mods-available/{mod}.load")
        site = conf / "sites-enabled/hcloud-ha-web.conf"
        if not site.is_symlink():
            site.symlink_to("../sites-available/hcloud-ha-web.conf")
        (conf / "sites-enabled/000-default.conf").unlink(missing_ok=True)
        for d in ("run/apache2", "var/lock/apache2", "var/log/apache2", *_OPS_DIRS):
            (rt.root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        self._validate(name, "web")

    def _install_lb(self, name: str) -> None:
        rt = self.hosts[name]
        assert self.settings is not None
        script = interface_facts_script(self.settings.subnet_cidr, rt.layout)
        rt.host.run(["sh", "-ec", script], timeout=15)
        self._write(self.rendered(name))
        for d in ("run/haproxy", "var/log", "var/lib/haproxy", *_OPS_DIRS):
            (rt.root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        rt.host.run(["sysctl", "-q", "-p", str(rt.root / "etc/sysctl.d/60-hcloud-ha-web.conf")])
        self._validate(name, "lb")

    def reconfigure(self, **overrides: Any) -> None:
        """Re-render every host with changed settings and reload HAProxy and Apache in place.

        HAProxy gets SIGUSR2 (master-worker reload), Apache SIGUSR1 (graceful), as
        ``systemctl reload`` does on a real host; keepalived keeps running.
        """
        assert self.api is not None
        self.settings_overrides = {**self.settings_overrides, **overrides}
        self.settings = lab_settings(self.lab.web_count, self.api.url, **self.settings_overrides)
        for web in self.lab.webs:
            self._install_web(web.name)
            before = self._apache_error_log(web.name).count("resuming normal operations")
            self._signal(web.name, "apache2", signal.SIGUSR1)
            self._wait_logged(
                partial(self._apache_error_log, web.name),
                "resuming normal operations",
                before,
                f"graceful restart of Apache on {web.name}",
            )
        for lb in self.lab.lbs:
            self._write(self.rendered(lb.name))
            self._validate(lb.name, "lb")
            before = self.daemon_log(lb.name, "haproxy").count("Loading success.")
            master = self.hosts[lb.name].procs["haproxy"].pid
            old_workers = set(child_pids(master))
            self._signal(lb.name, "haproxy", signal.SIGUSR2)
            self._wait_logged(
                partial(self.daemon_log, lb.name, "haproxy"),
                "Loading success.",
                before,
                f"reload of HAProxy on {lb.name}",
            )
            # Until the old workers are gone they may still accept a connection with the
            # old config; the lab's clients never hold one open, so this is quick.
            wait_for(
                partial(_gone, old_workers, master),
                10,
                f"old HAProxy workers on {lb.name} to finish",
            )
        self.wait_settled(15)

    # -- daemons -------------------------------------------------------------------
    def _popen(
        self, name: str, daemon: str, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        rt = self.hosts[name]
        old = rt.procs.get(daemon)
        if old is not None and old.poll() is None:
            raise LabError(f"{daemon} already runs on {name} (pid {old.pid})")
        log = rt.host.logdir / f"{name}-{daemon}.log"
        rt.procs[daemon] = rt.host.popen(argv, log=log, env=env, cwd=str(REPO_ROOT))

    def _stop(self, rt: HostRuntime, daemon: str, sig: int) -> None:
        proc = rt.procs.pop(daemon, None)
        if proc is not None:
            rt.host.kill(proc, sig)

    def _signal(self, name: str, daemon: str, sig: int) -> None:
        proc = self.hosts[name].procs.get(daemon)
        if proc is None or proc.poll() is not None:
            raise LabError(f"{daemon} is not running on {name}")
        os.kill(proc.pid, sig)

    @staticmethod
    def _wait_logged(read: Callable[[], str], text: str, before: int, what: str) -> None:
        wait_for(lambda: read().count(text) > before, 10, what)

    def _apache_error_log(self, name: str) -> str:
        path = self.hosts[name].root / "var/log/apache2/error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def daemon_log(self, name: str, daemon: str) -> str:
        path = self.lab[name].logdir / f"{name}-{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def running(self, name: str, daemon: str) -> bool:
        proc = self.hosts[name].procs.get(daemon)
        return proc is not None and proc.poll() is None

    def haproxy_command(self, name: str, command: str, timeout: float = 2.0) -> str:
        path = self.hosts[name].root / "run/haproxy/admin.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            for _ in range(10_000):
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def start_apache(self, name: str) -> None:
        root = self.hosts[name].root
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C",
            "APACHE_RUN_USER": "www-data",
            "APACHE_RUN_GROUP": "www-data",
            "APACHE_RUN_DIR": str(root / "run/apache2"),
            "APACHE_PID_FILE": str(root / "run/apache2/apache2.pid"),
            "APACHE_LOCK_DIR": str(root / "var/lock/apache2"),
            "APACHE_LOG_DIR": str(root / "var/log/apache2"),
        }
        conf = root / "etc/apache2"
        argv = ["apache2", "-d", str(conf), "-f", str(conf / "apache2.conf"), "-DFOREGROUND"]
        self._popen(name, "apache2", argv, env)

    def kill_apache(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._stop(self.hosts[name], "apache2", sig)

    def start_haproxy(self, name: str) -> None:
        cfg = self.hosts[name].root / "etc/haproxy/haproxy.cfg"
        self._popen(name, "haproxy", ["haproxy", "-Ws", "-f", str(cfg)])

    def kill_haproxy(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._stop(self.hosts[name], "haproxy", sig)

    def start_keepalived(self, name: str) -> None:
        root = self.hosts[name].root
        # pid files of our own instance that we killed (SIGKILL leaves them behind)
        for pid_file in ("keepalived.pid", "vrrp.pid", "checkers.pid"):
            (root / "run" / pid_file).unlink(missing_ok=True)
        argv = [
            "keepalived",
            "-n",
            "-l",
            "-D",
            "-f",
            str(root / "etc/keepalived/keepalived.conf"),
            "-p",
            str(root / "run/keepalived.pid"),
            "-r",
            str(root / "run/vrrp.pid"),
            "-c",
            str(root / "run/checkers.pid"),
        ]
        self._popen(name, "keepalived", argv)

    def kill_keepalived(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._stop(self.hosts[name], "keepalived", sig)

    def start_node_exporter(self, name: str) -> None:
        """prometheus-node-exporter with the flags the rendered /etc/default file gives."""
        rt = self.hosts[name]
        defaults = rt.root / "etc/default/prometheus-node-exporter"
        # systemd's EnvironmentFile unquotes the value; `$ARGS` then splits on whitespace
        args = next(
            " ".join(shlex.split(line.split("=", 1)[1])).split()
            for line in defaults.read_text().splitlines()
            if line.startswith("ARGS=")
        )
        self._popen(name, "node-exporter", ["prometheus-node-exporter", *args])

    def wait_node_exporter(self, name: str, timeout: float = 10.0) -> None:
        try:
            wait_for(
                lambda: self.lab[name].run(["ss", "-Hltn", "sport = :9100"]).stdout.strip(),
                timeout,
                f"node exporter on {name}",
            )
        except TimeoutError as exc:
            raise LabError(f"{exc}\n{self.daemon_log(name, 'node-exporter')[-2000:]}") from None

    def ops_log(self, name: str) -> str:
        """What the metrics script and the event hook logged on ``name``."""
        path = Path(self.hosts[name].layout.ops_log_file)
        return path.read_text(errors="replace") if path.exists() else ""

    def start_haproxy_watch(self, name: str) -> None:
        """The watcher that tells keepalived (track_file) when HAProxy dies."""
        script = str(self.hosts[name].root) + HAPROXY_WATCH
        self._popen(name, "haproxy-watch", ["python3", script])

    def haproxy_down_flag(self, name: str) -> str:
        """What the watcher last wrote for keepalived: "0" (HAProxy answers) or "1"."""
        path = Path(str(self.hosts[name].root) + HAPROXY_DOWN_FILE)
        return path.read_text().strip() if path.exists() else ""

    def start_lb(self, name: str, timeout: float = 10.0) -> None:
        self.start_haproxy(name)
        wait_for(lambda: self.haproxy_healthy(name), timeout, f"haproxy on {name}")
        self.start_haproxy_watch(name)
        wait_for(lambda: self.haproxy_down_flag(name) == "0", timeout, f"watcher on {name}")
        self.start_keepalived(name)

    def vanish(self, name: str) -> None:
        """The host is gone: every process SIGKILLed at once, every link down."""
        rt = self.hosts[name]
        self.lab.link_down(name)
        for daemon in list(rt.procs):
            self._stop(rt, daemon, signal.SIGKILL)
        rt.host.kill_all(timeout=3)

    def return_host(self, name: str, timeout: float = 10.0) -> None:
        """Undo :meth:`vanish`: links up, daemons started as at boot."""
        self.lab.link_up(name)
        if name in topo.LB_NAMES:
            self.start_lb(name, timeout)
        else:
            self.start_apache(name)
        self.start_node_exporter(name)

    def partition_lbs(self) -> None:
        """Split brain: no packet between the LBs' private addresses gets through.

        Each LB gets a permanent neighbour entry giving its peer a MAC nobody has, so
        its VRRP adverts reach no one (the peer's kernel drops frames not addressed to
        it).  This machine has neither nft nor iptables, tc's drop action is missing in
        this kernel, and keepalived's device-bound socket ignores a blackhole route.
        The web servers stay reachable from both LBs.
        """
        for name in topo.LB_NAMES:
            peer = next(n for n in topo.LB_NAMES if n != name)
            iface = self.lab[name].private_iface
            assert iface is not None
            self.lab[name].ip(
                "neigh", "replace", topo.LB_PRIVATE_IPS[peer], "lladdr", BLACKHOLE_MAC,
                "dev", iface, "nud", "permanent",
            )  # fmt: skip

    def heal_lbs(self) -> None:
        for name in topo.LB_NAMES:
            peer = next(n for n in topo.LB_NAMES if n != name)
            iface = self.lab[name].private_iface
            assert iface is not None
            self.lab[name].ip("neigh", "del", topo.LB_PRIVATE_IPS[peer], "dev", iface, check=False)

    def failover_log(self, name: str) -> str:
        path = Path(self.hosts[name].layout.failover_log_file)
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self, name: str) -> str:
        path = self.hosts[name].root / "var/log/apache2/access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def python_argv(self, module: str, *args: str) -> list[str]:
        return [sys.executable, "-m", module, *args]
