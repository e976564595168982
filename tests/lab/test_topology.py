"""The lab topology: hosts, addresses, Hetzner-style floating IP routing, teardown."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.netns import (
    IFNAME_MAX,
    LabError,
    cleanup_prefix,
    leftovers,
    netns_pids,
    requirements_missing,
)
from lab.probe import tcp_probe
from lab.topology import (
    CLIENT_IP,
    FLOATING_IP,
    LB_PRIVATE_IFACES,
    MAX_WEBS,
    PRIVATE_SUBNET,
    LabNetwork,
    web_private_iface,
)

REPO = Path(__file__).resolve().parents[2]

# --- no root needed --------------------------------------------------------------------


def test_requirements_missing_names_the_missing_tool() -> None:
    reason = requirements_missing(["ip", "no-such-tool-hw"])
    assert reason is not None
    assert "no-such-tool-hw" in reason


def test_every_interface_name_fits_even_with_the_most_web_servers() -> None:
    prefix = "hwffff"
    names = ["lb1", "lb2", "client", "api", *(f"web{k}" for k in range(1, MAX_WEBS + 1))]
    for name in names:
        for tag in ("u", "v"):
            assert len(f"{prefix}-{name}-{tag}") <= IFNAME_MAX
    assert len(f"{prefix}-priv") <= IFNAME_MAX


def test_private_interface_names_differ_between_hosts() -> None:
    names = {*LB_PRIVATE_IFACES.values(), web_private_iface(1), web_private_iface(2)}
    assert len(names) >= 2


def test_bad_lab_arguments_are_refused() -> None:
    with pytest.raises(LabError):
        LabNetwork(web_count=0)
    with pytest.raises(LabError):
        leftovers("not-a-prefix")


# --- lab ---------------------------------------------------------------------------------


@pytest.mark.lab
def test_topology_comes_up_with_hetzner_like_interfaces(lab_net: LabNetwork) -> None:
    lab = lab_net
    assert [h.name for h in lab] == ["lb1", "lb2", "web1", "web2", "client", "api"]
    for host in lab:
        assert Path("/run/netns", host.ns).exists()
        assert host.ns.startswith(lab.prefix + "-")
        assert "UP" in host.ip("-o", "link", "show", "lo")
    # the private interface is found from the subnet, and its name differs per host
    found = {}
    for host in [*lab.lbs, *lab.webs]:
        out = host.ip("-o", "-4", "addr", "show", "to", PRIVATE_SUBNET)
        iface = out.split()[1]
        assert iface == host.private_iface
        assert f"{host.private_ip}/24" in out
        found[host.name] = iface
    assert found == {"lb1": "ens10", "lb2": "enp7s0", "web1": "ens10", "web2": "enp7s0"}
    # public side: eth0 on LBs, client, api; web servers have none
    for host in [*lab.lbs, lab.client, lab.api]:
        assert f"{host.public_ip}/24" in host.ip("-o", "-4", "addr", "show", "dev", "eth0")
    for lb in lab.lbs:
        assert f"{FLOATING_IP}/32" in lb.ip("-o", "-4", "addr", "show", "dev", "eth0")
    for web in lab.webs:
        assert "eth0" not in web.ip("-o", "link", "show")
    # as on Hetzner, the LBs' default route names their public interface
    for lb in lab.lbs:
        assert lb.ip("-o", "-4", "route", "show", "default").split()[4] == "eth0"
    # nothing of the lab exists in the root namespace
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab.prefix not in root_links
    assert lab.floating_ip_target() == "lb1"


@pytest.mark.lab
def test_hosts_reach_each_other_on_the_private_network(lab_net: LabNetwork) -> None:
    private = [*lab_net.lbs, *lab_net.webs]
    for src in private:
        for dst in private:
            if src is not dst:
                assert dst.private_ip is not None
                probe = src.call(tcp_probe, dst.private_ip, timeout=5)
                assert probe.reached, f"{src.name} -> {dst.name}: {probe}"


@pytest.mark.lab
def test_client_cannot_reach_the_private_network(lab_net: LabNetwork) -> None:
    web_ip = lab_net.webs[0].private_ip
    assert web_ip is not None
    # The same probe reaches the client's own side (an LB's public address): it runs.
    lb_public = lab_net["lb1"].public_ip
    assert lb_public is not None
    assert lab_net.client.call(tcp_probe, lb_public, timeout=5).reached
    probe = lab_net.client.call(tcp_probe, web_ip, timeout=5)
    # No route at all, as on Hetzner: the kernel says so at once (not a mere timeout).
    assert probe.outcome == "unreachable", probe


@pytest.mark.lab
def test_floating_ip_traffic_follows_the_clients_route(
    lab_net: LabNetwork, listeners: Callable[..., object], curl_fip: Callable[..., str]
) -> None:
    for lb in lab_net.lbs:
        listeners(lb)
    assert curl_fip(lab_net) == "lb1"
    lab_net.route_floating_ip_to("lb2")
    assert lab_net.floating_ip_target() == "lb2"
    assert curl_fip(lab_net) == "lb2"
    lab_net.route_floating_ip_to("lb1")
    assert curl_fip(lab_net) == "lb1"
    with pytest.raises(LabError):
        lab_net.route_floating_ip_to("web1")


def _send_gratuitous_arp(iface: str, ip_addr: str, count: int = 3) -> None:
    """Broadcast ARP announcements (request and reply form) claiming ``ip_addr``."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        sock.bind((iface, 0))
        mac = sock.getsockname()[4]
        ip_bytes = socket.inet_aton(ip_addr)
        bcast = b"\xff" * 6
        for _ in range(count):
            for op in (1, 2):
                frame = bcast + mac + struct.pack("!H", 0x0806)
                frame += struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
                frame += mac + ip_bytes + bcast + ip_bytes
                sock.send(frame)
            time.sleep(0.01)
    finally:
        sock.close()


@pytest.mark.lab
def test_gratuitous_arp_does_not_move_floating_ip_traffic(
    lab_net: LabNetwork, listeners: Callable[..., object], curl_fip: Callable[..., str]
) -> None:
    for lb in lab_net.lbs:
        listeners(lb)
    assert curl_fip(lab_net) == "lb1"
    lab_net["lb2"].call(_send_gratuitous_arp, "eth0", FLOATING_IP)
    time.sleep(0.05)
    assert curl_fip(lab_net) == "lb1"
    assert lab_net.floating_ip_target() == "lb1"


@pytest.mark.lab
def test_link_down_makes_a_host_vanish_and_link_up_brings_it_back(
    lab_net: LabNetwork, listeners: Callable[..., object], curl_fip: Callable[..., str]
) -> None:
    port = listeners(lab_net["lb1"]).port
    lb1_ip = lab_net["lb1"].private_ip
    assert lb1_ip is not None
    assert lab_net["web1"].call(tcp_probe, lb1_ip, timeout=5).reached
    assert lab_net.client.call(tcp_probe, FLOATING_IP, port, timeout=5).outcome == "connected"
    lab_net.link_down("lb1")
    # The client's connection to the floating IP gets no answer at all (not a refusal).
    to_fip = lab_net.client.call(tcp_probe, FLOATING_IP, port, 0.5, timeout=5)
    assert to_fip.outcome in ("timeout", "unreachable"), to_fip
    probe = lab_net["web1"].call(tcp_probe, lb1_ip, timeout=5)
    assert probe.outcome in ("timeout", "unreachable"), probe
    lab_net.link_up("lb1")
    assert curl_fip(lab_net) == "lb1"
    assert lab_net["web1"].call(tcp_probe, lb1_ip, timeout=5).reached


@pytest.mark.lab
def test_call_runs_python_inside_the_namespace(lab_net: LabNetwork) -> None:
    def my_netns() -> str:
        return os.readlink("/proc/thread-self/ns/net")

    inside = lab_net.client.call(my_netns)
    assert inside != my_netns()
    assert inside == lab_net.client.call(my_netns)
    addrs = lab_net.client.call(socket.gethostbyname, CLIENT_IP)
    assert addrs == CLIENT_IP


@pytest.mark.lab
def test_popen_is_tracked_and_kill_stops_the_whole_process_group(lab_net: LabNetwork) -> None:
    web = lab_net["web1"]
    proc = web.popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    deadline = time.monotonic() + 3
    while len(netns_pids(web.ns)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(netns_pids(web.ns)) == 3  # sh and two sleeps
    assert proc in web.processes
    assert web.log_path(proc) is not None
    rc = web.kill(proc)
    assert rc is not None
    assert netns_pids(web.ns) == []
    assert proc not in web.processes


@pytest.mark.lab
def test_run_reports_failures_and_timeouts(lab_net: LabNetwork) -> None:
    from lab.netns import CommandError

    with pytest.raises(CommandError):
        lab_net.client.run(["false"])
    with pytest.raises(subprocess.TimeoutExpired):
        lab_net.client.run(["sleep", "5"], timeout=0.2)


# --- teardown ----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state


@pytest.mark.lab
def test_teardown_leaves_nothing_behind() -> None:
    if reason := requirements_missing():
        pytest.skip(reason)
    with LabNetwork(web_count=1) as lab:
        proc = lab["lb1"].popen(["sleep", "30"])
        prefix, workdir = lab.prefix, lab.workdir
        assert len(leftovers(prefix)) == 6  # lb1 lb2 web1 client api sw
    assert leftovers(prefix) == []
    assert not _alive(proc.pid)
    assert not workdir.exists()


@pytest.mark.lab
def test_teardown_after_an_exception_inside_the_block() -> None:
    if reason := requirements_missing():
        pytest.skip(reason)
    lab = LabNetwork(web_count=1)
    with pytest.raises(RuntimeError, match="boom"), lab:
        orphan = lab["web1"].popen(["sh", "-c", "setsid sleep 30 & wait"])
        time.sleep(0.1)
        escaped = [p for p in netns_pids(lab["web1"].ns) if p != orphan.pid]
        raise RuntimeError("boom")
    assert leftovers(lab.prefix) == []
    assert escaped and not any(_alive(p) for p in escaped)
    # a failed block keeps its work dir (logs) for a look; remove it here
    assert lab.workdir.exists()
    import shutil

    shutil.rmtree(lab.workdir)


_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from lab.topology import LabNetwork
    with LabNetwork(web_count=1) as lab:
        proc = lab["lb1"].popen(["sleep", "30"])
        print(lab.prefix, proc.pid, flush=True)
        for _ in range(300):  # bounded: 30 s at most
            time.sleep(0.1)
    """
)


@pytest.mark.lab
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_teardown_when_the_harness_gets_a_signal(sig: int) -> None:
    if reason := requirements_missing():
        pytest.skip(reason)
    harness = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_SCRIPT],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    prefix = ""
    try:
        assert harness.stdout is not None
        ready, _, _ = select.select([harness.stdout], [], [], 15)
        assert ready, "harness printed nothing within 15 s"
        line = harness.stdout.readline()
        assert line, f"harness died: {harness.stderr.read() if harness.stderr else ''}"
        prefix, pid_text = line.split()
        assert leftovers(prefix)
        harness.send_signal(sig)
        harness.wait(timeout=15)
        assert leftovers(prefix) == []
        assert not _alive(int(pid_text))
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(timeout=5)
        if prefix:
            cleanup_prefix(prefix)
