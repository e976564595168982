"""Local cloud, HTTPS: Debian 13 and 12 hosts get their certificates from the lab's ACME CA
(Pebble) through the program's own remote steps; the systemd timer's unit renews a due
certificate into the running HAProxy; a reboot keeps serving HTTPS.

Pebble issues certificates valid for 20 days here, inside the 30-day renewal window, so
every one is due: what an old certificate is on a real cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from lab.cloud.cluster import CloudCluster
from lab.cluster import wait_for
from lab.scenarios import check_https_served_by
from lab.topology import CLIENT_IP, LB_NAMES
from lab.traffic import TrafficStream, outage

if TYPE_CHECKING:
    from tests.cloud.conftest import Bench

pytestmark = pytest.mark.cloud

IMAGES = ("debian-13", "debian-12")
DOMAINS = ("site.lab.example", "www.site.lab.example")
TIMER = "hcloud-ha-web-cert.timer"
SERVICE = "hcloud-ha-web-cert.service"


@pytest.fixture(scope="module", params=IMAGES)
def cluster(request: pytest.FixtureRequest, bench: Bench) -> Iterator[CloudCluster]:
    image: str = request.param
    with CloudCluster(image, domains=DOMAINS, admin_cidrs=(f"{CLIENT_IP}/32",)) as c:
        t0 = time.monotonic()
        result = c.apply()
        assert result.ok, result.failure()
        c.wait_settled(60)
        bench.record("https_booted_to_provisioned_with_certs", time.monotonic() - t0, "s",
                     image=image, steps=len(result.runs))  # fmt: skip
        yield c


def test_both_lbs_get_certificates_through_the_programs_steps(cluster: CloudCluster) -> None:
    for lb in LB_NAMES:
        check_https_served_by(cluster, lb)
        assert cluster.ssh(lb, f"systemctl is-enabled {TIMER}").strip() == "enabled"
        assert cluster.ssh(lb, f"systemctl is-active {TIMER}").strip() == "active"
        mode = cluster.ssh(lb, f"stat -c '%a %U' {cluster.tls_cert_path(lb)}").strip()
        assert mode == "600 root", mode
        status = cluster.cert_command(lb, "status", check=False)
        assert "issuer /CN=Pebble" in status.stdout or "Pebble" in status.stdout, status.stdout


def test_the_timers_unit_renews_a_due_certificate_without_failing_a_request(
    cluster: CloudCluster,
) -> None:
    before = {lb: cluster.served_cert(lb)["Serial"] for lb in LB_NAMES}
    stream = TrafficStream(cluster.lab.client, cluster.https_url, duration=60, timeout=2.0,
                           **cluster.tls_stream_args())  # fmt: skip
    try:
        stream.wait_started()
        for lb in LB_NAMES:  # what the timer starts when it elapses
            cluster.ssh(lb, f"systemctl start {SERVICE}", timeout=200)
        time.sleep(0.5)
    finally:
        records = stream.stop()
    for lb in LB_NAMES:
        after = cluster.served_cert(lb)["Serial"]
        assert after != before[lb], (lb, before[lb], after)
        journal = cluster.ssh(lb, f"journalctl -q --no-pager -o cat -u {SERVICE}")
        assert "hot-loaded into HAProxy via the runtime API" in journal, journal[-2000:]
        check_https_served_by(cluster, lb)
    assert records and not [r for r in records if not r["ok"]], records[:3]
    assert outage(records).failed == 0


def test_a_reboot_keeps_serving_https(cluster: CloudCluster) -> None:
    cluster.reboot("lb2", "lb1")
    for lb in LB_NAMES:
        cluster.wait_active(lb, 60)
    cluster.wait_settled(60)
    for lb in LB_NAMES:
        # HAProxy comes back with the CA's certificate from disk (not the placeholder);
        # the timer may renew it meanwhile (20-day certificates are always due here)
        wait_for(lambda lb=lb: cluster.served_cert(lb).get("Serial"), 20, f"cert on {lb}")
        served = check_https_served_by(cluster, lb)
        assert "Pebble" in served["Issuer"], served
        assert cluster.ssh(lb, "systemctl is-active hcloud-ha-web-cert.timer").strip() == "active"
