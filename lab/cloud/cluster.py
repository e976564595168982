"""The whole cluster on booted Debian hosts, provisioned by the program's own remote steps.

``CloudCluster(image="debian-13")`` builds the lab topology (`lab.topology.LabNetwork`,
without pre-set floating IPs: provisioning adds them), starts the fake Hetzner API, and
boots one systemd-nspawn host (`lab.cloud.host`) inside each server's namespace: lb1,
lb2 and the web servers, all from the image the settings name.

:meth:`plan` runs the Pulumi program (`__main__.py`) under mocks whose servers are these
hosts: server ids the fake API knows, addresses the hosts have, the lab's floating IP, a
stack config made from the lab's `Settings` and secrets (the lab's SSH key, the fake
API's token). :meth:`apply` runs the resulting remote steps over SSH
(`lab.cloud.apply`), keeping what was applied so a later apply runs only changed steps.

Observation (`lab.cluster.ClusterView`) works as for the process lab, through the host
namespaces and over SSH: systemd states, the journal, HAProxy's runtime socket.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from components import day2
from components.config import PROJECT, Settings, settings_to_config
from components.render import ACME_RENEW_DAYS, CERT_SCRIPT, TLS_CERT
from components.site_steps import CHECK_STEP_SUFFIX
from lab import topology as topo
from lab.acme import PebbleCA, launch_acme
from lab.cloud.apply import STEP_TIMEOUT, ApplyResult, Event, apply, replay_copy, rollout, run_step
from lab.cloud.common import CloudError, Log
from lab.cloud.host import BootTiming, CloudHost
from lab.cloud.lab import CloudLab, parallel
from lab.cluster import ClusterView, lab_settings, wait_for
from lab.fake_hcloud import FakeApi, launch
from lab.program import PlannedResource, ProviderFacts, RemoteStep, program_plan, reveal
from lab.topology import LabNetwork

STATS_PASSWORD = "cloud-lab-stats-password"
#: Pebble's certificate lifetime in the local cloud: inside the renewal window (due at once)
ACME_VALIDITY_SECONDS = (ACME_RENEW_DAYS - 10) * 86400
#: systemd units of the daemons, by the names the scenarios use
UNITS = {"apache2": "apache2", "haproxy": "haproxy", "keepalived": "keepalived"}
HAPROXY_SOCKET = "/run/haproxy/admin.sock"
_SOCKET_CLIENT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(float(sys.argv[2]))\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.stdin.buffer.read())\n"
    "for _ in range(10000):\n"
    "    b=s.recv(65536)\n"
    "    if not b: break\n"
    "    sys.stdout.buffer.write(b)\n"
)


class CloudCluster(ClusterView):
    """Booted hosts in the lab topology; :meth:`close` tears everything down."""

    def __init__(
        self,
        image: str = "debian-13",
        web_count: int = 2,
        *,
        log: Log | None = None,
        spare_webs: int = 0,
        **settings_overrides: Any,
    ) -> None:
        self.image = image
        self.web_count = web_count
        self.settings_overrides = settings_overrides
        self._log = log
        # spare_webs: namespaces (addresses, server ids) for web servers a later webCount
        # adds; no host boots there until an update creates the server.
        self.lab = LabNetwork(web_count + spare_webs, floating_ip_on_lbs=False)
        self.api: FakeApi | None = None
        self.acme: PebbleCA | None = None
        self.settings: Settings | None = None
        self.stats_password = STATS_PASSWORD
        self.cloud: CloudLab | None = None
        self.hosts: dict[str, CloudHost] = {}
        self.boot_timings: dict[str, BootTiming] = {}
        #: the steps as last applied (what the engine's state would hold)
        self.applied: dict[str, RemoteStep] = {}
        #: every resource as last deployed (the engine's state), for `update`
        self.state: dict[str, PlannedResource] = {}
        #: stdout of the commands whose output the program reads, with the inputs it
        #: came from (the engine's state of those commands)
        self.outputs: dict[str, tuple[tuple[str, ...], str]] = {}
        #: the remote steps of the program `update` is rolling out (its copies replay them)
        self._steps: dict[str, RemoteStep] = {}

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> CloudCluster:
        try:
            self.lab.start()
            self.api = launch(self.lab)
            if self.settings_overrides.get("domains"):
                # HTTPS: Pebble on the public side; its certificates expire inside the
                # renewal window, so the timer's unit has real work to do.
                self.acme = launch_acme(self.lab, validity_seconds=ACME_VALIDITY_SECONDS)
                self.settings_overrides.setdefault("acme_directory", self.acme.directory_url)
                self.settings_overrides.setdefault("acme_email", "lab@hcloud-ha-web.example")
            self.cloud = CloudLab(log=self._log)
            # root's authorized_keys is managed by the program (its keys step): the key
            # the lab logs in with is the stack's sshPublicKey.
            overrides = {"ssh_public_key": self.cloud.public_key, **self.settings_overrides}
            self.settings = lab_settings(
                self.web_count, self.api.url, image=self.image, **overrides
            )
            for name in self.names:
                self.hosts[name] = self.cloud.host(name, self.lab[name].ns, self.image)
            self.boot_timings = self.cloud.boot()
            if self.acme is not None:
                self._trust_lab_acme_ca()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Hosts first (they live in the topology's namespaces), then the topology."""
        try:
            if self.cloud is not None:
                self.cloud.close()
        finally:
            self.lab.close()

    def __enter__(self) -> CloudCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return [*topo.LB_NAMES, *(topo.web_name(k) for k in range(1, self.web_count + 1))]

    # -- the program -----------------------------------------------------------------
    def address(self, name: str) -> str:
        """The address a step connects to: the LBs' public IP; web servers have none in
        the lab (the client cannot reach the private network), so their private one."""
        host = self.lab[name]
        address = host.public_ip or host.private_ip
        assert address is not None
        return address

    def facts(self) -> ProviderFacts:
        assert self.settings is not None
        ids = {
            **topo.LB_SERVER_IDS,
            **{topo.web_name(k): topo.web_server_id(k) for k in range(1, self.web_count + 1)},
        }
        return ProviderFacts(
            servers={
                f"{self.settings.cluster_name}-{n}": (ids[n], self.address(n)) for n in self.names
            },
            floating_ip=(topo.FLOATING_IP_ID, topo.FLOATING_IP),
            deployed=bool(self.state),
        )

    def stack_config(self) -> tuple[dict[str, str], list[str]]:
        """The stack config `pulumi up` would read, and its secret keys."""
        assert self.settings is not None and self.api is not None and self.cloud is not None
        values = settings_to_config(self.settings)
        values |= {
            "sshPrivateKey": self.cloud.key_path.read_text(),
            "failoverToken": self.api.token,
            "statsPassword": self.stats_password,
        }
        config = {f"{PROJECT}:{k}": v for k, v in values.items()}
        secret = [f"{PROJECT}:{k}" for k in ("sshPrivateKey", "failoverToken", "statsPassword")]
        return config, secret

    def plan(self) -> dict[str, RemoteStep]:
        """The remote steps the program registers for this cluster (under mocks)."""
        return self.plan_all()[0]

    def plan_all(self) -> tuple[dict[str, RemoteStep], dict[str, PlannedResource]]:
        """The remote steps and every resource the program registers (under mocks)."""
        config, secret_keys = self.stack_config()
        return program_plan(
            config, secret_keys, self.facts(), lab=True, command_stdout=self.command_stdout
        )

    def command_stdout(self, name: str, inputs: Mapping[str, Any]) -> str | None:
        """The stdout of a command whose output the program reads (the site check):
        from the state while its inputs are unchanged, else by running it on its host
        now, as the engine runs it before anything that depends on its output."""
        if not name.endswith(CHECK_STEP_SUFFIX):
            return None
        inputs = reveal(inputs)  # the connection holds the private key: a secret
        address = str(inputs["connection"]["host"])
        key = (address, str(inputs["create"]), *map(str, inputs.get("triggers", [])))
        if name in self.outputs and self.outputs[name][0] == key:
            return self.outputs[name][1]
        by_address = {self.address(n): h for n, h in self.hosts.items()}
        stdout = by_address[address].ssh(str(inputs["create"]), timeout=60).stdout
        self.outputs[name] = (key, stdout)
        return stdout

    def apply(
        self, steps: Mapping[str, RemoteStep] | None = None, *, force: bool = False
    ) -> ApplyResult:
        """Run what changed since the last apply (everything the first time or with
        ``force``); successful steps become the new applied state, as in the engine."""
        resources: dict[str, PlannedResource] = {}
        if steps is None:
            steps, resources = self.plan_all()
        steps = dict(steps)
        by_address = {self.address(n): h for n, h in self.hosts.items()}
        result = apply(steps, by_address, self.applied or None, force=force)
        for name, run in result.runs.items():
            if run.status == "ran":
                self.applied[name] = steps[name]
        if result.ok and resources and not self.state:
            self.state = resources  # the first deployment: every resource exists now
        return result

    def update(
        self,
        planned: tuple[dict[str, RemoteStep], dict[str, PlannedResource]] | None = None,
        **settings: Any,
    ) -> tuple[ApplyResult, list[Event]]:
        """`pulumi up` with changed settings on the deployed cluster: the program's
        resources diffed against the last deployment and replayed in the engine's order
        (`lab.cloud.apply.rollout`); servers are created, deleted and power-cycled here,
        commands and hooks run on the hosts. The new state keeps what succeeded.

        `planned`: the program as `plan_all()` gave it earlier (e.g. with an edited
        template), instead of planning it now."""
        assert self.settings is not None and self.state, "deploy first (apply)"
        previous = self.settings
        if "web_count" in settings and "web_private_ips" not in settings:
            count = int(settings["web_count"])
            settings["web_private_ips"] = tuple(topo.web_private_ip(k) for k in range(1, count + 1))
        self.settings = dataclasses.replace(self.settings, **settings)
        self.web_count = self.settings.web_count
        try:
            steps, new = planned if planned is not None else self.plan_all()
        except BaseException:
            self.settings, self.web_count = previous, previous.web_count
            raise
        day2.REMOTE_RUNNER = self._run_hook_script
        self._steps = steps
        try:
            result, events = rollout(self.state, new, self, hooks=day2.HOOKS)
        finally:
            day2.REMOTE_RUNNER = None
        state = dict(self.state)
        for name, run in result.runs.items():
            if run.status in ("ran", "unchanged") and name in new:
                state[name] = new[name]
            elif run.status == "ran" and name not in new:
                state.pop(name, None)  # deleted
        self.state = state
        # a step that failed or did not run stays as it was last applied
        self.applied = {
            **{n: s for n, s in self.applied.items() if n in state},
            **{n: steps[n] for n in steps if n in state and state[n] is new.get(n)},
        }
        return result, events

    # -- the provider's part of the replay (lab.cloud.apply.Cloud) ---------------------
    def _host_of(self, resource_name: str) -> str:
        assert self.settings is not None
        return resource_name.removeprefix(f"{self.settings.cluster_name}-")

    def run(self, address: str, script: str, stdin: str) -> tuple[int, str, str]:
        hosts = {self.address(n): h for n, h in self.hosts.items()}
        host = hosts.get(address)
        if host is None or not host.running:
            return 255, "", f"no running server at {address}"
        try:
            r = run_step(host, script, stdin, STEP_TIMEOUT)
        except CloudError as exc:
            return 255, "", str(exc)
        return r.returncode, r.stdout, r.stderr

    def copy(self, name: str) -> tuple[int, str, str]:
        step = self._steps[name]
        hosts = {self.address(n): h for n, h in self.hosts.items()}
        host = hosts.get(step.host)
        if host is None or not host.running:
            return 255, "", f"no running server at {step.host}"
        r = replay_copy(step, host, STEP_TIMEOUT)
        return r.returncode, r.stdout, r.stderr

    def _run_hook_script(self, address: str, script: str) -> None:
        rc, _out, err = self.run(address, script, "")
        if rc != 0:
            raise CloudError(f"hook script on {address} failed (exit {rc}): {err[-2000:]}")

    def server_create(self, name: str, inputs: Mapping[str, Any]) -> None:
        """A fresh host from the server's image in the server's namespace (same address)."""
        assert self.cloud is not None and self.settings is not None
        host = self._host_of(name)
        # Hetzner puts the project's SSH key (sshPublicKey) on a new server; the keys step
        # manages authorized_keys from then on.
        self.cloud.public_key = self.settings.ssh_public_key
        self.cloud.hosts.pop(host, None)
        h = self.cloud.host(host, self.lab[host].ns, str(inputs["image"]))
        self.boot_timings.update(self.cloud.boot(h))
        self.hosts[host] = h
        if self.acme is not None and host in topo.LB_NAMES:
            self._trust_lab_acme_ca((host,))  # a fresh image, before any step runs

    def server_delete(self, name: str) -> None:
        host = self._host_of(name)
        if host in self.hosts:
            self.power_off(host)
            self.hosts.pop(host).destroy()

    def server_update(self, name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """An in-place update (a resize): the server is powered off and on again."""
        self.reboot(self._host_of(name))

    # -- hosts -----------------------------------------------------------------------
    def ssh(self, name: str, command: str, **kw: Any) -> str:
        return self.hosts[name].ssh(command, **kw).stdout

    def main_pids(self, name: str) -> dict[str, int]:
        """MainPID of each daemon unit of ``name`` (0: not running)."""
        units = ["apache2"] if name.startswith("web") else ["haproxy", "keepalived"]
        out = self.ssh(name, "systemctl show -p MainPID --value " + " ".join(units)).split()
        return {u: int(p) for u, p in zip(units, out, strict=True)}

    def stop_unit(self, name: str, daemon: str) -> None:
        self.ssh(name, f"systemctl stop {UNITS[daemon]}")

    def start_unit(self, name: str, daemon: str) -> None:
        self.ssh(name, f"systemctl start {UNITS[daemon]}")

    def kill_unit(self, name: str, daemon: str) -> None:
        """Crash: SIGKILL to every process of the unit; its restart policy applies."""
        self.ssh(name, f"systemctl kill --signal=KILL {UNITS[daemon]}")

    def power_off(self, name: str) -> None:
        """The host goes away: container stopped, and what its kernel held in the
        namespace (addresses it added, sysctls) is gone, as after a real power cycle."""
        self.hosts[name].stop()
        ns = self.lab[name]
        for iface in ("lo", ns.public_iface, ns.private_iface):
            if iface:
                ns.ip("-4", "addr", "del", f"{topo.FLOATING_IP}/32", "dev", iface, check=False)
        ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=0"])

    def power_on(self, name: str) -> BootTiming:
        return self.hosts[name].start(wait=True)

    def reboot(self, *names: str) -> dict[str, BootTiming]:
        """Power-cycle hosts (in parallel); back when systemd reports the boot finished."""
        parallel(self.power_off, names)
        return dict(zip(names, parallel(self.power_on, names), strict=True))

    def wait_active(self, name: str, timeout: float = 30.0) -> None:
        units = ["apache2"] if name.startswith("web") else ["haproxy", "keepalived"]
        wait_for(
            lambda: all(self.running(name, u) for u in units),
            timeout,
            f"{', '.join(units)} active on {name}",
            step=0.3,
        )

    # -- HTTPS -------------------------------------------------------------------------
    def _trust_lab_acme_ca(self, names: tuple[str, ...] = topo.LB_NAMES) -> None:
        """The LBs' ACME client (curl) trusts Pebble's API through the system store of
        these lab hosts only (as a Hetzner image trusts Let's Encrypt's); the program
        itself ships no trust for it."""
        assert self.acme is not None
        pem = self.acme.api_ca.read_text()
        for name in names:
            self.ssh(
                name,
                "cat > /usr/local/share/ca-certificates/hcloud-ha-web-lab-acme.crt"
                " && update-ca-certificates >/dev/null",
                stdin=pem,
            )

    @property
    def issuing_root(self) -> str:
        assert self.acme is not None, "no ACME CA in this cluster (no domains)"
        return str(self.acme.issuing_root)

    def tls_cert_path(self, name: str) -> str:
        return TLS_CERT

    def cert_command(
        self, name: str, *args: str, check: bool = True, timeout: float = 150
    ) -> subprocess.CompletedProcess[str]:
        return self.hosts[name].ssh(
            " ".join([CERT_SCRIPT, *map(shlex.quote, args)]), check=check, timeout=timeout
        )

    # -- ClusterView -------------------------------------------------------------------
    def running(self, name: str, daemon: str) -> bool:
        if not self.hosts[name].running:
            return False
        r = self.hosts[name].ssh(f"systemctl is-active --quiet {UNITS[daemon]}", check=False)
        return r.returncode == 0

    @staticmethod
    def haproxy_client(timeout: float = 2.0) -> str:
        """Shell that sends its stdin to HAProxy's runtime API on the host, prints the answer."""
        return f"python3 -c {shlex.quote(_SOCKET_CLIENT)} {HAPROXY_SOCKET} {timeout}"

    def haproxy_command(self, name: str, command: str, timeout: float = 2.0) -> str:
        return self.ssh(
            name, self.haproxy_client(timeout), stdin=command + "\n", timeout=timeout + 10
        )

    def daemon_log(self, name: str, daemon: str) -> str:
        if not self.hosts[name].running:
            return ""
        return self.ssh(name, f"journalctl -q --no-pager -o cat -u {UNITS[daemon]}", check=False)

    def failover_log(self, name: str) -> str:
        if not self.hosts[name].running:
            return ""
        return self.ssh(name, "journalctl -q --no-pager -o cat -t hcloud-floating-ip", check=False)

    def memory_peaks(self) -> dict[str, int]:
        """Highest anonymous memory sampled per host over its life, in bytes."""
        return {n: h.anon_peak_bytes() for n, h in self.hosts.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.cloud.cluster [--image debian-12]``: boot, provision with the
    program's steps, print each step and the cluster's state, tear everything down."""
    parser = argparse.ArgumentParser(prog="python -m lab.cloud.cluster", description=main.__doc__)
    parser.add_argument("--image", default="debian-13", choices=("debian-13", "debian-12"))
    parser.add_argument("--web-count", type=int, default=2)
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    with CloudCluster(args.image, args.web_count, log=log) as c:
        result = c.apply()
        for run in result.runs.values():
            print(f"{run.name:32} {run.status:9} {run.seconds:6.1f}s")
        if not result.ok:
            print(result.failure(), file=sys.stderr)
            return 1
        c.wait_settled(30)
        print(c.describe())
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CloudError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None
