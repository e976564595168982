"""Local cloud: `make status` (ops.status) against booted, provisioned Debian hosts.

The collecting code gets the stack's outputs (as `pulumi stack output` would give them for
this cluster) and a runner that runs its commands over SSH on the hosts, exactly what
`make status` does against Hetzner. A healthy cluster reports nothing wrong; each wrong
state the issue lists is made for real (a stopped web server, a failed unit, a certificate
about to expire, the API routing the IP to the backup, a split brain) and must be named.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from lab.cloud.cluster import CloudCluster
from lab.cloud.common import CloudError
from lab.cluster import wait_for
from lab.measure import distribution
from lab.topology import FLOATING_IP, FLOATING_IP_ID, LB_NAMES, LB_PRIVATE_IPS, LB_SERVER_IDS
from ops.stack import Result, StackOutputs
from ops.status import collect, render

if TYPE_CHECKING:
    from tests.cloud.conftest import Bench

pytestmark = pytest.mark.cloud
#: a locally administered MAC no host has: a neighbour entry to it drops the peer's VRRP
BLACKHOLE_MAC = "02:00:5e:ff:ff:01"


@pytest.fixture(scope="module")
def provisioned(cloud_prefix: str) -> Iterator[CloudCluster]:
    with CloudCluster("debian-13") as c:
        result = c.apply()
        assert result.ok, result.failure()
        c.wait_settled(60)
        yield c


@pytest.fixture
def cluster(provisioned: CloudCluster) -> Iterator[CloudCluster]:
    provisioned.wait_settled(30)
    yield provisioned
    provisioned.wait_settled(60)


def outputs(c: CloudCluster) -> StackOutputs:
    """What `pulumi stack output --json --show-secrets` gives for this cluster."""
    facts = c.facts()
    assert c.settings is not None
    prefix = f"{c.settings.cluster_name}-"
    return StackOutputs.from_json(
        {
            "floating_ip": FLOATING_IP,
            "public_ipv4": {n.removeprefix(prefix): a for n, (_, a) in facts.servers.items()},
            "private_ip": {n: c.lab[n].private_ip for n in c.names},
            "server_id": {n.removeprefix(prefix): i for n, (i, _) in facts.servers.items()},
        }
    )


def runner(c: CloudCluster) -> Any:
    def run(host: str, command: str, timeout: float) -> Result:
        try:
            proc = c.hosts[host].ssh(command, timeout=timeout, check=False)
        except CloudError as err:  # a timeout
            return Result(124, "", str(err))
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


def status(c: CloudCluster) -> dict[str, Any]:
    report = collect(outputs(c), runner(c), timeout=15)
    print(render(report))
    return report


def test_a_healthy_cluster_reports_nothing_wrong(cluster: CloudCluster, bench: Bench) -> None:
    seconds = []
    for _ in range(5):
        t0 = time.monotonic()
        report = status(cluster)
        seconds.append(time.monotonic() - t0)
    spread = distribution(seconds)
    bench.record("status_collect", spread["median"], "s", **spread, servers=len(cluster.names))
    assert report["problems"] == [], report["problems"]
    assert report["ok"] is True
    assert report["api_owner"] == "lb1"
    hosts = report["hosts"]
    assert (hosts["lb1"]["vrrp_state"], hosts["lb2"]["vrrp_state"]) == ("MASTER", "BACKUP")
    assert hosts["lb1"]["priority"] > hosts["lb2"]["priority"]
    for lb in LB_NAMES:
        assert hosts[lb]["backends"]["servers"] == {"web1": "UP", "web2": "UP"}
        assert hosts[lb]["units"]["active"]["keepalived"] == "active"
    assert hosts["web1"]["units"]["active"] == {
        "apache2": "active",
        "prometheus-node-exporter": "active",
    }
    text = render(report, color=False)
    assert "\033[" not in text and "OK:" in text
    assert "\033[" in render(report, color=True)


def test_a_failover_is_listed_with_its_claim_time(cluster: CloudCluster) -> None:
    cluster.stop_unit("lb1", "haproxy")
    try:
        cluster.wait_owner("lb2", 15)
        report = status(cluster)
        assert report["hosts"]["lb2"]["vrrp_state"] == "MASTER"
        latest = report["failovers"][0]
        assert (latest["from"], latest["to"]) == ("lb1", "lb2")
        assert latest["claim_seconds"] is not None and 0 <= latest["claim_seconds"] < 10
        assert "lb1: haproxy is inactive" in report["problems"]
    finally:
        cluster.start_unit("lb1", "haproxy")
    cluster.wait_settled(30)
    latest = status(cluster)["failovers"][0]
    assert (latest["from"], latest["to"]) == ("lb2", "lb1")


def test_a_stopped_web_server_is_named(cluster: CloudCluster) -> None:
    cluster.stop_unit("web2", "apache2")
    try:
        for lb in LB_NAMES:
            wait_for(
                lambda lb=lb: cluster.server_status(lb).get("web2", "").startswith("DOWN"),
                10,
                f"web2 DOWN on {lb}",
            )
        problems = status(cluster)["problems"]
        assert "lb1's HAProxy sees backend web2 DOWN" in problems
        assert "lb2's HAProxy sees backend web2 DOWN" in problems
        assert "web2: apache2 is inactive" in problems
    finally:
        cluster.start_unit("web2", "apache2")


def test_a_failed_unit_is_named(cluster: CloudCluster) -> None:
    # a oneshot start waits for the process, so systemd-run itself reports the failure
    cluster.ssh("web1", "! systemd-run -q --unit=hcloud-ha-web-broken -p Type=oneshot /bin/false")
    try:
        wait_for(
            lambda: "failed" in cluster.ssh("web1", "systemctl is-failed hcloud-ha-web-broken "
                                            "|| true"),
            10,
            "the unit to fail",
        )  # fmt: skip
        report = status(cluster)
        assert "web1: failed unit hcloud-ha-web-broken.service" in report["problems"]
        assert report["ok"] is False
    finally:
        cluster.ssh("web1", "systemctl reset-failed hcloud-ha-web-broken")
    assert status(cluster)["problems"] == []


def test_a_certificate_expiring_within_14_days_is_named(cluster: CloudCluster) -> None:
    cluster.ssh(
        "lb2",
        "mkdir -p /etc/haproxy/certs && cd /etc/haproxy/certs && openssl req -x509 -newkey ec"
        " -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3 -subj /CN=status.test"
        " -keyout /tmp/k.pem -out soon.pem 2>/dev/null && openssl req -x509 -newkey ec"
        " -pkeyopt ec_paramgen_curve:P-256 -nodes -days 90 -subj /CN=status.test"
        " -keyout /tmp/k.pem -out later.pem 2>/dev/null",
    )
    try:
        report = status(cluster)
        expiring = [p for p in report["problems"] if "certificate" in p]
        assert len(expiring) == 1 and expiring[0].startswith("lb2: certificate soon.pem expires in")
        assert "later.pem" in report["hosts"]["lb2"]["certs"]
    finally:
        cluster.ssh("lb2", "rm -f /etc/haproxy/certs/soon.pem /etc/haproxy/certs/later.pem")


def test_the_api_routing_the_ip_to_the_backup_is_named(cluster: CloudCluster) -> None:
    assert cluster.api is not None
    client = cluster.api.client
    try:
        for _ in range(3):  # lb1's ownership check may win the race once; bounded
            client.assign(LB_SERVER_IDS["lb2"], FLOATING_IP_ID)
            # keep lb1's claim from taking the IP back while status looks
            client.set_faults([{"kind": "locked", "on": "assign"}] * 200)
            time.sleep(0.5)
            if client.assigned_server(FLOATING_IP_ID) == LB_SERVER_IDS["lb2"]:
                break
        report = status(cluster)
        assert report["api_owner"] == "lb2"
        assert (
            "the Hetzner API routes the floating IP to lb2 (BACKUP), not to the master lb1"
            in report["problems"]
        )
    finally:
        client.clear_faults()
    cluster.wait_owner("lb1", 30)


def test_two_masters_are_named(cluster: CloudCluster) -> None:
    def neighbours(action: str) -> None:
        for name in LB_NAMES:
            peer = next(n for n in LB_NAMES if n != name)
            iface = cluster.lab[name].private_iface
            assert iface is not None
            extra = ["lladdr", BLACKHOLE_MAC, "nud", "permanent"] if action == "replace" else []
            cluster.lab[name].ip(
                "neigh", action, LB_PRIVATE_IPS[peer], "dev", iface, *extra, check=False
            )

    neighbours("replace")
    try:
        wait_for(lambda: cluster.masters() == ["lb1", "lb2"], 15, "split brain")
        problems = status(cluster)["problems"]
        assert "two masters: lb1 and lb2 (split brain)" in problems
    finally:
        neighbours("del")
    wait_for(lambda: cluster.masters() == ["lb1"], 15, "healed")
