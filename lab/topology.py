"""The lab's Hetzner-like topology: one network namespace per server.

Address plan (fixed; every address is in 198.18.0.0/15 and exists only inside
namespaces this module creates)::

    private network (the Hetzner cloud network) 198.18.1.0/24, bridge <prefix>-priv
        lb1    198.18.1.11   iface ens10
        lb2    198.18.1.12   iface enp7s0
        webK   198.18.1.(20+K)  iface ens10 (K odd) / enp7s0 (K even)
    public side 198.19.0.0/24, bridge <prefix>-pub, iface eth0 everywhere
        api    198.19.0.2    (the fake Hetzner API, port 8080)
        lb1    198.19.0.11
        lb2    198.19.0.12
        client 198.19.0.100
    floating IP 198.19.1.1 (on eth0 of both LBs, /32, like Hetzner's guide says)
    198.19.0.1 is the LBs' default gateway, as Hetzner's 172.31.1.1 is: no host
    has it (nothing leaves the lab), but ``ip route show default`` names the
    public interface, which is how provisioning finds it.

Names: host ``lb1`` of run ``hw3f9a`` is namespace ``hw3f9a-lb1``.  The two
bridges live in namespace ``hw3f9a-sw`` (never in the root namespace), joined
to each host by a veth pair whose switch side is ``hw3f9a-lb1-u`` (public) or
``hw3f9a-lb1-v`` (private).  The private interface name differs per host, as
on Hetzner, so nothing can hard-code it; find it from the subnet
(``ip -o -4 addr show to 198.18.1.0/24``).

Floating IP routing works as on Hetzner: both LBs carry the address, and the
client's route ``198.19.1.1/32 via <LB public IP>`` decides which LB gets the
traffic (:meth:`LabNetwork.route_floating_ip_to`, or the fake API's assign
call).  The client never ARPs for the floating IP, so gratuitous ARP from a
keepalived master moves nothing.  At start the client is routed to lb1.

Simplification: the private network is a plain L2 bridge with /24 addresses;
real Hetzner cloud networks are routed (/32 plus a gateway at .1).  Neither
the interface lookup by subnet nor unicast VRRP notices the difference.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from lab.netns import (
    IFNAME_MAX,
    NETNS_DIR,
    Host,
    LabError,
    check_ifname,
    cleanup_prefix,
    delete_namespace,
    ip,
    leftovers,
    new_prefix,
    run,
)

PRIVATE_SUBNET = "198.18.1.0/24"
PUBLIC_SUBNET = "198.19.0.0/24"
PREFIXLEN = 24
FLOATING_IP = "198.19.1.1"
FLOATING_IP_ID = 4711
API_IP = "198.19.0.2"
API_PORT = 8080
CLIENT_IP = "198.19.0.100"
#: Default gateway of the LBs' public side; deliberately no host has this address.
PUBLIC_GATEWAY = "198.19.0.1"
PUBLIC_IFACE = "eth0"
LB_NAMES = ("lb1", "lb2")
LB_PUBLIC_IPS = {"lb1": "198.19.0.11", "lb2": "198.19.0.12"}
LB_PRIVATE_IPS = {"lb1": "198.18.1.11", "lb2": "198.18.1.12"}
LB_PRIVATE_IFACES = {"lb1": "ens10", "lb2": "enp7s0"}
#: Hetzner server ids the fake API knows the LBs by.
LB_SERVER_IDS = {"lb1": 101, "lb2": 102}
MAX_WEBS = 50


def web_name(k: int) -> str:
    return f"web{k}"


def web_private_ip(k: int) -> str:
    return f"198.18.1.{20 + k}"


def web_private_iface(k: int) -> str:
    return "ens10" if k % 2 else "enp7s0"


def web_server_id(k: int) -> int:
    return 200 + k


_ACTIVE: list[LabNetwork] = []
_ACTIVE_LOCK = threading.Lock()
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class LabInterrupted(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM/SIGHUP arrives while a lab is up."""


def _close_all_at_exit() -> None:
    with _ACTIVE_LOCK:
        labs = list(_ACTIVE)
    for lab in reversed(labs):
        try:
            lab.close()
        except Exception as exc:  # pragma: no cover - last resort
            print(f"lab: teardown at exit of {lab.prefix} failed: {exc}")


atexit.register(_close_all_at_exit)


class LabNetwork:
    """Context manager that builds the topology and always tears it down.

    ``with LabNetwork(web_count=2) as lab: ...`` gives hosts ``lab["lb1"]``,
    ``lab.lbs``, ``lab.webs``, ``lab.client``, ``lab.api`` (see
    :class:`lab.netns.Host`).  Teardown (also on exceptions, Ctrl-C, SIGTERM,
    SIGHUP and interpreter exit) stops every process by PID, deletes every
    namespace (which takes the bridges and veths with it) and checks that
    nothing of the prefix is left.

    ``workdir`` holds logs (``<workdir>/logs``) and anything a test wants to
    put there; it is removed at teardown unless ``keep_workdir`` is true, or
    ``keep_workdir`` is ``None`` (default) and the block raised.
    """

    def __init__(
        self,
        web_count: int = 2,
        *,
        prefix: str | None = None,
        floating_ip_on_lbs: bool = True,
        workdir: str | Path | None = None,
        keep_workdir: bool | None = None,
        handle_signals: bool = True,
    ) -> None:
        if not 1 <= web_count <= MAX_WEBS:
            raise LabError(f"web_count must be 1..{MAX_WEBS}, got {web_count}")
        self.web_count = web_count
        self.prefix = prefix or new_prefix()
        self.floating_ip_on_lbs = floating_ip_on_lbs
        self._workdir_arg = Path(workdir) if workdir else None
        self.workdir: Path = Path("/nonexistent")
        self.keep_workdir = keep_workdir
        self.handle_signals = handle_signals
        self.switch_ns = f"{self.prefix}-sw"
        self.public_bridge = check_ifname(f"{self.prefix}-pub")
        self.private_bridge = check_ifname(f"{self.prefix}-priv")
        self.hosts: dict[str, Host] = {}
        self._started = False
        self._closed = False
        self._failed = False
        self._prev_handlers: dict[int, Any] = {}
        self._pending_signal: int | None = None

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> LabNetwork:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._failed = True
        self.close()

    def start(self) -> LabNetwork:
        if self._started:
            raise LabError("lab already started")
        self._started = True
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        self._install_signal_handlers()
        try:
            self._build()
        except BaseException:
            self._failed = True
            self.close()
            raise
        return self

    def close(self) -> None:
        """Tear everything down; idempotent; raises ``LabError`` if something is left over."""
        if self._closed or not self._started:
            return
        self._closed = True
        deferred = self._defer_signals()
        errors: list[str] = []
        try:
            for host in reversed(list(self.hosts.values())):
                try:
                    host.kill_all()
                except Exception as exc:
                    errors.append(f"stopping processes on {host.name}: {exc}")
            for ns in [h.ns for h in reversed(list(self.hosts.values()))] + [self.switch_ns]:
                try:
                    delete_namespace(ns)
                except Exception as exc:
                    errors.append(f"deleting namespace {ns}: {exc}")
            left = leftovers(self.prefix)
            if left:
                cleanup_prefix(self.prefix)
                left = leftovers(self.prefix)
                if left:
                    errors.append("left over after teardown: " + ", ".join(left))
            keep = self.keep_workdir if self.keep_workdir is not None else self._failed
            if self.workdir.exists():
                if keep:
                    print(f"lab {self.prefix}: kept work dir {self.workdir}")
                elif self._workdir_arg is None:
                    shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            with _ACTIVE_LOCK:
                if self in _ACTIVE:
                    _ACTIVE.remove(self)
            self._restore_signal_handlers(deferred)
        if errors:
            raise LabError(f"lab {self.prefix} teardown: " + "; ".join(errors))
        if self._pending_signal is not None:
            sig, self._pending_signal = self._pending_signal, None
            raise LabInterrupted(f"signal {sig} during lab teardown")

    # -- signals -------------------------------------------------------------
    def _in_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()

    def _install_signal_handlers(self) -> None:
        if not (self.handle_signals and self._in_main_thread()):
            return
        for sig in _HANDLED_SIGNALS:
            self._prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        raise LabInterrupted(f"lab {self.prefix}: got signal {signum}")

    def _defer_signals(self) -> dict[int, Any]:
        """While tearing down, note signals instead of being interrupted by them."""
        if not self._in_main_thread():
            return {}
        saved: dict[int, Any] = {}

        def note(signum: int, frame: FrameType | None) -> None:
            self._pending_signal = signum

        for sig in (signal.SIGINT, *_HANDLED_SIGNALS):
            saved[sig] = signal.getsignal(sig)
            signal.signal(sig, note)
        return saved

    def _restore_signal_handlers(self, deferred: dict[int, Any]) -> None:
        if not self._in_main_thread():
            return
        for sig, handler in deferred.items():
            signal.signal(sig, self._prev_handlers.get(sig, handler))
        self._prev_handlers.clear()

    # -- building ------------------------------------------------------------
    def _build(self) -> None:
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        logdir = self.workdir / "logs"
        logdir.mkdir(exist_ok=True)
        names = [*LB_NAMES, *(web_name(k) for k in range(1, self.web_count + 1)), "client", "api"]
        for name in names:
            if (NETNS_DIR / f"{self.prefix}-{name}").exists():
                raise LabError(f"namespace {self.prefix}-{name} already exists")
        # the switch: two bridges in a namespace of their own
        self._add_netns(self.switch_ns)
        self._ip_batch(
            self.switch_ns,
            [
                "link set lo up",
                f"link add {self.public_bridge} type bridge stp_state 0 forward_delay 0",
                f"link add {self.private_bridge} type bridge stp_state 0 forward_delay 0",
                f"link set {self.public_bridge} up",
                f"link set {self.private_bridge} up",
            ],
        )
        for name in names:
            host = Host(name, f"{self.prefix}-{name}", logdir)
            self.hosts[name] = host
            self._add_netns(host.ns)
            if name in LB_NAMES:
                host.public_ip, host.public_iface = LB_PUBLIC_IPS[name], PUBLIC_IFACE
                host.private_ip, host.private_iface = LB_PRIVATE_IPS[name], LB_PRIVATE_IFACES[name]
            elif name.startswith("web"):
                k = int(name[3:])
                host.private_ip, host.private_iface = web_private_ip(k), web_private_iface(k)
            elif name == "client":
                host.public_ip, host.public_iface = CLIENT_IP, PUBLIC_IFACE
            else:  # api
                host.public_ip, host.public_iface = API_IP, PUBLIC_IFACE
            self._wire(host)
        for lb in LB_NAMES:
            if self.floating_ip_on_lbs:
                self.hosts[lb].ip("addr", "add", f"{FLOATING_IP}/32", "dev", PUBLIC_IFACE)
        self.route_floating_ip_to("lb1")

    def _add_netns(self, ns: str) -> None:
        ip("netns", "add", ns)
        # no IPv6 (no DAD/RS noise), as sysctls of that namespace only
        run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ]
        )

    def _ip_batch(self, ns: str, lines: list[str]) -> None:
        run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")

    def _wire(self, host: Host) -> None:
        sw_cmds: list[str] = []
        host_cmds = ["link set lo up"]
        sides = [
            ("u", self.public_bridge, host.public_iface, host.public_ip),
            ("v", self.private_bridge, host.private_iface, host.private_ip),
        ]
        for tag, bridge, iface, addr in sides:
            if iface is None or addr is None:
                continue
            port = f"{host.ns}-{tag}"
            if len(port) > IFNAME_MAX:
                raise LabError(f"switch port name {port!r} is longer than {IFNAME_MAX} characters")
            check_ifname(iface)
            sw_cmds += [
                f"link add {port} type veth peer name {iface} netns {host.ns}",
                f"link set {port} master {bridge}",
                f"link set {port} up",
            ]
            host_cmds += [f"addr add {addr}/{PREFIXLEN} dev {iface}", f"link set {iface} up"]
            host.switch_ports.append(port)
        if host.name in LB_NAMES:
            host_cmds.append(f"route add default via {PUBLIC_GATEWAY} dev {PUBLIC_IFACE}")
        self._ip_batch(self.switch_ns, sw_cmds)
        self._ip_batch(host.ns, host_cmds)

    def add_public_host(self, name: str, address: str) -> Host:
        """One more host on the public side only (e.g. the lab's ACME CA), torn down with
        the lab like the others."""
        if name in self.hosts:
            raise LabError(f"host {name!r} already exists in lab {self.prefix}")
        if not address.startswith("198.19.0."):
            raise LabError(f"{address} is not on the public side 198.19.0.0/24")
        host = Host(name, f"{self.prefix}-{name}", self.workdir / "logs")
        host.public_ip, host.public_iface = address, PUBLIC_IFACE
        self.hosts[name] = host
        self._add_netns(host.ns)
        self._wire(host)
        return host

    # -- access ------------------------------------------------------------
    def __getitem__(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(
                f"no host {name!r} in lab {self.prefix}; hosts: {', '.join(self.hosts)}"
            ) from None

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    @property
    def lbs(self) -> list[Host]:
        return [self.hosts[n] for n in LB_NAMES]

    @property
    def webs(self) -> list[Host]:
        return [self.hosts[web_name(k)] for k in range(1, self.web_count + 1)]

    @property
    def client(self) -> Host:
        return self.hosts["client"]

    @property
    def api(self) -> Host:
        return self.hosts["api"]

    @property
    def api_url(self) -> str:
        """Base URL of the fake Hetzner API (Hetzner's is ``https://api.hetzner.cloud/v1``)."""
        return f"http://{API_IP}:{API_PORT}/v1"

    # -- floating IP routing ---------------------------------------------------
    def route_command(self) -> str:
        """Argv template for the fake API's ``--route-cmd`` (fills ``{ip}``, ``{server_ip}``)."""
        return (
            f"ip -n {self.client.ns} route replace {{ip}}/32 via {{server_ip}} dev {PUBLIC_IFACE}"
        )

    def unroute_command(self) -> str:
        """Argv template for the fake API's ``--unroute-cmd``."""
        return f"ip -n {self.client.ns} route delete {{ip}}/32"

    def route_floating_ip_to(self, lb_name: str) -> None:
        """Point the client's floating-IP route at ``lb_name`` (what Hetzner's assign does)."""
        if lb_name not in LB_NAMES:
            raise LabError(f"not a load balancer: {lb_name!r} (one of {', '.join(LB_NAMES)})")
        self.client.ip(
            "route",
            "replace",
            f"{FLOATING_IP}/32",
            "via",
            LB_PUBLIC_IPS[lb_name],
            "dev",
            PUBLIC_IFACE,
        )

    def floating_ip_target(self) -> str | None:
        """Which LB the client's route sends floating-IP traffic to (``None``: no route)."""
        out = self.client.ip("-4", "route", "show", f"{FLOATING_IP}/32", check=False).split()
        if "via" not in out:
            return None
        via = out[out.index("via") + 1]
        for name, addr in LB_PUBLIC_IPS.items():
            if addr == via:
                return name
        return None

    # -- failures ----------------------------------------------------------
    def link_down(self, name: str) -> None:
        """Cut every link of host ``name`` at the switch (the host vanishes from both networks)."""
        for port in self[name].switch_ports:
            ip("-n", self.switch_ns, "link", "set", port, "down")

    def link_up(self, name: str) -> None:
        """Reconnect host ``name`` (undo :meth:`link_down`)."""
        for port in self[name].switch_ports:
            ip("-n", self.switch_ns, "link", "set", port, "up")

    # -- diagnostics -----------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Namespaces/links of this run's prefix that exist right now."""
        return leftovers(self.prefix)

    def describe(self) -> str:
        """A human-readable summary of hosts and addresses."""
        lines = [f"lab {self.prefix} (work dir {self.workdir})"]
        for h in self.hosts.values():
            parts = []
            if h.public_ip:
                parts.append(f"{h.public_iface} {h.public_ip}")
            if h.private_ip:
                parts.append(f"{h.private_iface} {h.private_ip}")
            lines.append(f"  {h.name:<7} netns {h.ns:<14} " + ", ".join(parts))
        lines.append(f"  floating IP {FLOATING_IP} -> {self.floating_ip_target()}")
        return "\n".join(lines)
