"""Lab tier: hcloud-haproxy-watch tells keepalived (track_file) that HAProxy died, and a
reload is not a death.

The watcher (templates/keepalived/haproxy-watch.j2, rendered like every file) runs in
lb1's namespace with no supervisor unit, so a dead HAProxy is a FAULT at once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from lab.cluster import LabCluster, assign_calls, wait_for
from tests.lab.test_scenarios import restore

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def settled(cluster: LabCluster) -> Iterator[LabCluster]:
    restore(cluster)
    yield cluster
    restore(cluster)


def test_dead_haproxy_is_a_fault_through_the_track_file(cluster: LabCluster) -> None:
    assert cluster.haproxy_down_flag("lb1") == "0"
    cluster.kill_haproxy("lb1")
    wait_for(lambda: cluster.haproxy_down_flag("lb1") == "1", 5, "watcher writes 1")
    wait_for(lambda: cluster.masters() == ["lb2"], 5, "lb2 sole master")
    log = cluster.daemon_log("lb1", "keepalived")
    # keepalived names the track file that failed: the watcher, not the 1 s script
    assert "haproxy_down" in log and "Entering FAULT STATE" in log, log[-2000:]
    assert "HAProxy is down: FAULT" in cluster.daemon_log("lb1", "haproxy-watch")
    cluster.start_haproxy("lb1")
    wait_for(lambda: cluster.haproxy_down_flag("lb1") == "0", 5, "watcher writes 0")
    cluster.wait_settled(15)


def test_haproxy_reload_is_not_a_death(cluster: LabCluster) -> None:
    watch_log = cluster.daemon_log("lb1", "haproxy-watch")
    before = {lb: cluster.vrrp_transitions(lb) for lb in ("lb1", "lb2")}
    reloads = cluster.daemon_log("lb1", "haproxy").count("Loading success.")
    t0 = time.time()
    cluster._signal("lb1", "haproxy", signal.SIGUSR2)  # what `systemctl reload` does
    wait_for(
        lambda: cluster.daemon_log("lb1", "haproxy").count("Loading success.") > reloads,
        10,
        "HAProxy reloaded",
    )
    # The probe ran: the old worker closed the watcher's connection and it reconnected.
    wait_for(
        lambda: "answered again" in cluster.daemon_log("lb1", "haproxy-watch")[len(watch_log) :],
        5,
        "watcher reconnected to the new worker",
    )
    time.sleep(1.0)
    new = cluster.daemon_log("lb1", "haproxy-watch")[len(watch_log) :]
    assert "FAULT" not in new, new
    assert cluster.haproxy_down_flag("lb1") == "0"
    assert {lb: cluster.vrrp_transitions(lb) for lb in ("lb1", "lb2")} == before
    assert assign_calls(cluster.api_calls(t0)) == []
