"""Lab tier: the HA behaviour on the real daemons with the files the program renders.

One cluster (2 LBs, 2 web servers, fake Hetzner API) is shared by the module; every test
leaves it settled again (lb1 sole master owning the floating IP, every daemon running,
every web server UP), which the autouse ``settled`` fixture enforces and checks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from components.render import OWNERSHIP_CHECK_INTERVAL
from lab.cluster import LabCluster, assign_calls, wait_for
from lab.scenarios import (
    check_lb_failover,
    check_round_robin,
    check_sticky,
    check_web_server_loss,
)
from lab.topology import CLIENT_IP, FLOATING_IP, LB_NAMES, LB_SERVER_IDS
from lab.traffic import TrafficStream, fetch, outage

pytestmark = pytest.mark.lab


def restore(c: LabCluster) -> None:
    """Undo whatever a scenario broke, then wait until the cluster has settled."""
    assert c.api is not None
    c.api.client.clear_faults()
    c.heal_lbs()
    for name in LB_NAMES:
        c.lab.link_up(name)
    for web in c.lab.webs:
        if not c.running(web.name, "apache2"):
            c.start_apache(web.name)
    for name in LB_NAMES:
        if not c.running(name, "haproxy"):
            c.start_haproxy(name)
            wait_for(lambda n=name: c.haproxy_healthy(n), 10, f"haproxy on {name}")
        if not c.running(name, "haproxy-watch"):
            c.start_haproxy_watch(name)
        if not c.running(name, "keepalived"):
            c.start_keepalived(name)
    c.wait_settled(20)


@pytest.fixture(autouse=True)
def settled(cluster: LabCluster) -> Iterator[LabCluster]:
    restore(cluster)
    yield cluster
    restore(cluster)


# -- 1 -----------------------------------------------------------------------------------
def test_round_robin_across_web_servers(cluster: LabCluster) -> None:
    check_round_robin(cluster)


# -- 2 -----------------------------------------------------------------------------------
def test_cookie_stickiness_prefix_mode(cluster: LabCluster) -> None:
    assert cluster.settings is not None and cluster.settings.cookie_mode == "prefix"
    check_sticky(cluster, "prefix")


def test_cookie_stickiness_insert_mode(cluster: LabCluster) -> None:
    cluster.reconfigure(cookie_mode="insert")
    try:
        check_sticky(cluster, "insert")
    finally:
        cluster.reconfigure(cookie_mode="prefix")


# -- 3 -----------------------------------------------------------------------------------
def test_web_server_loss_fails_no_request(cluster: LabCluster) -> None:
    check_web_server_loss(
        cluster,
        fail=lambda: cluster.kill_apache("web1"),
        recover=lambda: cluster.start_apache("web1"),
        timeout=5.0,
    )


# -- 4 -----------------------------------------------------------------------------------
def test_haproxy_crash_moves_ip_to_lb2(cluster: LabCluster) -> None:
    gap = check_lb_failover(cluster, fail=lambda: cluster.kill_haproxy("lb1"), timeout=5.0)
    assert gap.failed > 0  # the crash was seen: the measurement means something


# -- 5 -----------------------------------------------------------------------------------
def test_master_host_vanishes(cluster: LabCluster) -> None:
    stream = TrafficStream(cluster.lab.client, cluster.url, duration=20)
    try:
        stream.wait_started()
        time.sleep(0.3)
        t0 = time.time()
        cluster.vanish("lb1")
        cluster.wait_owner("lb2")
        wait_for(lambda: cluster.is_master("lb2"), 5, "lb2 VRRP master")
        stream.wait_recovered(t0)
    finally:
        records = stream.stop()
    posts = assign_calls(cluster.api_calls(t0))
    assert [p["server"] for p in posts if p["status"] == 201] == [LB_SERVER_IDS["lb2"]]
    gap = outage(records, t0)
    assert gap.recovered and gap.gap < 5.0, gap


# -- 6 -----------------------------------------------------------------------------------
def test_master_returns_and_takes_ip_back_without_flapping(cluster: LabCluster) -> None:
    cluster.vanish("lb1")
    cluster.wait_owner("lb2")
    lb2_masters = cluster.vrrp_transitions("lb2", "MASTER")
    t0 = time.time()
    cluster.return_host("lb1")
    cluster.wait_settled(15)
    time.sleep(3.0)  # watch a quiet window: nothing may move any more
    calls = cluster.api_calls(t0)
    posts = [p for p in assign_calls(calls) if p["status"] == 201]
    assert [p["server"] for p in posts] == [LB_SERVER_IDS["lb1"]], posts
    assert cluster.masters() == ["lb1"]
    assert cluster.assigned() == "lb1" and cluster.lab.floating_ip_target() == "lb1"
    # lb1 became master once (in its new life); lb2 did not become master again
    log1 = cluster.daemon_log("lb1", "keepalived")
    last_start = log1.rfind("Starting Keepalived")
    assert log1[last_start:].count("Entering MASTER STATE") == 1, log1[last_start:]
    assert cluster.vrrp_transitions("lb2", "MASTER") == lb2_masters


# -- 7 -----------------------------------------------------------------------------------
def test_api_transient_failures_are_retried(cluster: LabCluster) -> None:
    assert cluster.api is not None
    cluster.api.client.set_faults(["locked", "rate_limit", "server_error"])
    log_before = len(cluster.failover_log("lb2"))
    t0 = time.time()
    cluster.kill_haproxy("lb1")
    cluster.wait_owner("lb2", timeout=15)
    log = cluster.failover_log("lb2")[log_before:]
    posts = assign_calls(cluster.api_calls(t0))
    assert [p["status"] for p in posts] == [423, 429, 500, 201], posts
    assert "API busy (attempt 1): HTTP 423 locked" in log, log
    assert "API busy (attempt 2): HTTP 429 rate_limit_exceeded" in log, log
    assert "API busy (attempt 3): HTTP 500 server_error" in log, log
    assert "asked to assign floating IP" in log, log
    assert cluster.api.client.faults() == []


# -- 8 -----------------------------------------------------------------------------------
def test_split_brain_ends_with_one_owner(cluster: LabCluster) -> None:
    assert cluster.api is not None
    t0 = time.time()
    cluster.partition_lbs()
    try:
        wait_for(lambda: cluster.masters() == ["lb1", "lb2"], 5, "both LBs VRRP master")
        cluster.wait_owner("lb2")  # the newer master claimed it last
        time.sleep(1.0)  # a split brain that lasts: both keep advertising
    finally:
        cluster.heal_lbs()
    wait_for(lambda: cluster.masters() == ["lb1"], 5, "lb2 back to BACKUP")
    # notify_master_rx_lower_pri re-claims when lb1 hears lb2's lower-priority advert; if
    # lb2 went BACKUP first, lb1's periodic ownership check claims the address instead.
    cluster.wait_owner("lb1", timeout=OWNERSHIP_CHECK_INTERVAL + 5)
    time.sleep(1.5)
    assert cluster.masters() == ["lb1"]
    assert cluster.assigned() == "lb1" and cluster.lab.floating_ip_target() == "lb1"
    posts = [p["server"] for p in assign_calls(cluster.api_calls(t0)) if p["status"] == 201]
    assert posts[-1] == LB_SERVER_IDS["lb1"], posts
    assert cluster.get()["ok"]


# -- 9 -----------------------------------------------------------------------------------
def test_access_log_shows_client_address_and_no_health_checks(cluster: LabCluster) -> None:
    before = {w.name: len(cluster.access_log(w.name)) for w in cluster.lab.webs}
    for _ in range(4):
        assert cluster.get(cluster.url + "?from-test-9")["ok"]
    time.sleep(2 * 0.5 + 0.3)  # a few health-check rounds (500 ms interval)
    for web in cluster.lab.webs:
        new = cluster.access_log(web.name)[before[web.name] :].splitlines()
        mine = [ln for ln in new if "from-test-9" in ln]
        assert len(mine) == 2, new
        assert all(ln.startswith(CLIENT_IP + " ") for ln in mine), mine
        whole = cluster.access_log(web.name)
        assert "check.txt" not in whole, [ln for ln in whole.splitlines() if "check" in ln]


# -- 10 ----------------------------------------------------------------------------------
def test_stats_page_only_on_localhost_and_needs_the_password(cluster: LabCluster) -> None:
    """No domains: the stats page (basic auth over plain HTTP) is not on the public address;
    on each LB's localhost it asks for the password, taken whole."""
    user, password = cluster.stats_user, cluster.stats_password
    public = cluster.get(f"http://{FLOATING_IP}/haproxy?stats", auth=(user, password))
    assert public["status"] == 404, public  # the public address answered: the site's 404
    assert cluster.get()["status"] == 200  # (and the probe reaches the site)
    assert " " in password and "#" in password and "'" in password, "the lab's password"
    for lb in LB_NAMES:
        host = cluster.lab[lb]
        assert host.call(fetch, cluster.stats_url)["status"] == 401
        assert host.call(fetch, cluster.stats_url, auth=(user, "wrong"))["status"] == 401
        good = host.call(fetch, cluster.stats_url, auth=(user, password))
        assert good["status"] == 200, good
        # HAProxy splits unquoted words and starts a comment at '#': the value arrived
        # whole only if no shorter prefix is accepted.
        for cut in (password.split(" ")[0], password.split("#")[0], password.split("'")[0]):
            assert host.call(fetch, cluster.stats_url, auth=(user, cut))["status"] == 401, cut
