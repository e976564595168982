"""Lab tier, HTTPS: certificates from a real ACME CA (Pebble) on both LBs, renewed and
hot-loaded, through failover, and a CA that refuses.

One cluster with domains (2 LBs, 2 web servers, fake Hetzner API, Pebble +
challtestsrv) is shared by the module; each test leaves it settled. Only the client
(198.19.0.100) is in adminCidrs, so the acme host (198.19.0.3) stands in for the rest of
the internet.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.render import CERT_MISSING_FLAG, EVENT_HOOK, PLACEHOLDER_SUBJECT
from lab.cluster import LabCluster, wait_for
from lab.netns import requirements_missing
from lab.scenarios import (
    check_backup_renews_while_master_holds_ip,
    check_https_served_by,
    check_lb_failover,
    check_redirect_except_challenge,
    check_renewal_under_load,
    check_tls_protocols,
    curl,
)
from lab.topology import CLIENT_IP, FLOATING_IP, LB_NAMES, LabNetwork
from lab.traffic import TrafficStream, at_a_move, fetch, outage
from tests.lab.test_scenarios import restore

pytestmark = pytest.mark.lab
LAB_REASON = requirements_missing(
    ("ip", "haproxy", "keepalived", "apache2", "curl", "openssl", "dehydrated", "pebble",
     "pebble-challtestsrv")
)  # fmt: skip
DOMAINS = ("site.lab.example", "www.site.lab.example")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    if LAB_REASON:
        pytest.skip(f"LAB TIER NOT RUN: {LAB_REASON}")
    with (
        LabNetwork(web_count=2) as lab,
        LabCluster(lab, domains=DOMAINS, admin_cidrs=(f"{CLIENT_IP}/32",)) as c,
    ):
        yield c


@pytest.fixture(autouse=True)
def settled(cluster: LabCluster) -> Iterator[LabCluster]:
    restore(cluster)
    yield cluster
    restore(cluster)


def thumbprint_of(pem_path: Path) -> str:
    """RFC 7638 thumbprint of an RSA key file, computed with openssl (as dehydrated does)."""
    import subprocess

    out = subprocess.run(["openssl", "rsa", "-in", str(pem_path), "-noout", "-modulus"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    n = base64.urlsafe_b64encode(bytes.fromhex(out.split("=", 1)[1].strip())).rstrip(b"=")
    jwk = b'{"e":"AQAB","kty":"RSA","n":"' + n + b'"}'
    return base64.urlsafe_b64encode(hashlib.sha256(jwk).digest()).rstrip(b"=").decode()


def test_both_lbs_hold_a_certificate_from_the_ca(cluster: LabCluster) -> None:
    serials = {lb: check_https_served_by(cluster, lb)["Serial"] for lb in LB_NAMES}
    assert serials["lb1"] != serials["lb2"]  # each LB got its own
    for lb in LB_NAMES:
        root = cluster.hosts[lb].root
        keys = [Path(cluster.tls_cert_path(lb))]
        keys += list((root / "var/lib/hcloud-ha-web/acme/certs/site").glob("privkey*.pem"))
        assert len(keys) >= 2, keys
        for key in keys:
            st = key.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, (key, oct(st.st_mode))
        assert cluster.cert_command(lb, "status").returncode == 0


def test_backup_renews_while_the_master_holds_the_ip(cluster: LabCluster) -> None:
    check_backup_renews_while_master_holds_ip(cluster)


def test_http_redirects_to_https_except_the_challenge_path(cluster: LabCluster) -> None:
    key = cluster.hosts["lb1"].root / "etc/hcloud-ha-web/acme/account_key.pem"
    check_redirect_except_challenge(cluster, thumbprint_of(key))


def test_http2_and_only_tls_1_2_and_1_3(cluster: LabCluster) -> None:
    check_tls_protocols(cluster)


def test_stats_page_https_only_and_only_for_admin_cidrs(cluster: LabCluster) -> None:
    user, password = cluster.stats_user, cluster.stats_password
    root = cluster.issuing_root
    admin = curl(cluster, "--cacert", root, "-u", f"{user}:{password}", "-w", "\n%{http_code}",
                 cluster.stats_url)  # fmt: skip
    assert admin.stdout.endswith("\n200") and "Statistics Report" in admin.stdout, admin.stderr
    wrong = curl(cluster, "--cacert", root, "-u", f"{user}:nope", "-o", "/dev/null",
                 "-w", "%{http_code}", cluster.stats_url)  # fmt: skip
    assert wrong.stdout == "401", wrong
    # from outside adminCidrs (the acme host): the site answers, the stats page does not
    assert cluster.acme is not None
    outside = cluster.acme.host.call(fetch, cluster.stats_url, auth=(user, password),
                                     **cluster.tls_stream_args())  # fmt: skip
    site = cluster.acme.host.call(fetch, cluster.https_url, **cluster.tls_stream_args())
    assert site["status"] == 200, site
    assert outside["status"] == 403, outside


def test_forced_renewal_under_https_load_fails_no_request(cluster: LabCluster) -> None:
    check_renewal_under_load(cluster, "lb1")


def _failover_http_and_https(cluster: LabCluster, fail: str) -> tuple[float, float]:
    """One failover, HTTP and HTTPS streams side by side; returns both client gaps."""
    http = TrafficStream(cluster.lab.client, cluster.url, duration=40)
    https = TrafficStream(cluster.lab.client, cluster.https_url, duration=40,
                          **cluster.tls_stream_args())  # fmt: skip
    try:
        http.wait_started()
        https.wait_started()
        time.sleep(0.3)
        t0 = time.time()
        cluster.kill_haproxy("lb1") if fail == "haproxy" else cluster.vanish("lb1")
        cluster.wait_owner("lb2", 10)
        http.wait_recovered(t0, 10)
        https.wait_recovered(t0, 10)
        time.sleep(0.5)
    finally:
        http_records, https_records = http.stop(), https.stop()
    gaps = outage(http_records, t0), outage(https_records, t0)
    assert all(g.recovered and g.failed > 0 for g in gaps), gaps  # the failover was seen
    return gaps[0].gap, gaps[1].gap


@pytest.mark.parametrize("fail", ["haproxy", "host"])
def test_https_fails_over_as_fast_as_http(cluster: LabCluster, fail: str) -> None:
    http_gap, https_gap = _failover_http_and_https(cluster, fail)
    assert https_gap < 5.0, https_gap
    # the same event seen by both streams (20 ms apart): HTTPS may lag by a request or two
    assert https_gap <= http_gap + 0.5, (http_gap, https_gap)
    # lb2 served the new clients with its own, valid certificate
    assert fetch_ok(cluster)


def fetch_ok(cluster: LabCluster) -> bool:
    rec = cluster.lab.client.call(fetch, cluster.https_url, **cluster.tls_stream_args())
    return bool(rec["ok"])


def test_https_failover_check_shared_with_the_cloud_tier(cluster: LabCluster) -> None:
    gap = check_lb_failover(cluster, fail=lambda: cluster.kill_haproxy("lb1"), timeout=5.0,
                            https=True)  # fmt: skip
    assert gap.failed > 0


def test_a_refusing_ca_leaves_the_old_certificate_and_the_failure_visible(
    cluster: LabCluster,
) -> None:
    assert cluster.acme is not None
    root = cluster.hosts["lb1"].root
    hook = root / EVENT_HOOK.lstrip("/")
    events = root / "var/lib/hcloud-ha-web/events.log"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(f'#!/bin/sh\n{{ echo "$1"; cat; }} >> {events}\n')
    hook.chmod(0o755)
    before = cluster.served_cert("lb1")["Serial"]
    for d in DOMAINS:
        cluster.acme.refuse(d)
    try:
        failed = cluster.cert_command("lb1", "renew", "--force", check=False)
        assert failed.returncode == 1, failed.stdout
        assert "FAILED (1 in a row)" in failed.stdout, failed.stdout
        assert "connection refused" in failed.stdout.lower(), failed.stdout  # the CA's error
        # the old certificate still serves, verified
        assert cluster.served_cert("lb1")["Serial"] == before
        assert fetch_ok(cluster)
        status = cluster.cert_command("lb1", "status", check=False)
        assert status.returncode == 1 and "last attempt failed" in status.stdout, status.stdout
        state = cluster.cert_state("lb1")
        assert state["result"] == "failed" and state["failures"] == 1
        assert state["next_attempt"] >= time.time() + 14 * 60  # backoff, not a tight loop
        # the timer's next run backs off without asking the CA again
        log_before = cluster.acme.log().count("POST /order-plz")
        again = cluster.cert_command("lb1", "renew", check=False)
        assert again.returncode == 1 and "backing off" in again.stdout, again.stdout
        assert cluster.acme.log().count("POST /order-plz") == log_before
        wait_for(lambda: events.exists() and "cert_renewal_failed" in events.read_text(), 5,
                 "the event hook to be called")  # fmt: skip
        detail = json.loads(events.read_text().splitlines()[1])
        assert detail["failures"] == 1 and "refused" in detail["error"].lower(), detail
    finally:
        for d in DOMAINS:
            cluster.acme.accept(d)
        hook.unlink(missing_ok=True)
    cluster.cert_command("lb1", "renew", "--force")
    assert cluster.cert_command("lb1", "status").returncode == 0
    assert cluster.served_cert("lb1")["Serial"] != before
    assert os.path.exists(cluster.tls_cert_path("lb1"))


def _self_signed_placeholder() -> str:
    """A certificate + key like the one HAProxy starts with before the first issuance."""
    with tempfile.TemporaryDirectory() as tmp:
        key, crt = Path(tmp, "key.pem"), Path(tmp, "crt.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "1", "-subj", PLACEHOLDER_SUBJECT, "-keyout", str(key),
             "-out", str(crt)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return crt.read_text() + key.read_text()


def test_an_lb_without_a_usable_certificate_yields_the_floating_ip_to_its_peer(
    cluster: LabCluster,
) -> None:
    """A replaced LB before its first issuance (here lb1: its certificate file is a
    self-signed placeholder and the CA refuses) must not hold the floating IP while its
    peer has a certificate: keepalived lowers its priority and lb2 takes over. Its first
    certificate brings it back. HTTPS through the floating IP fails no request but one
    in flight at a move of the address (see lab.traffic.at_a_move)."""
    assert cluster.acme is not None
    flag = Path(str(cluster.hosts["lb1"].root) + CERT_MISSING_FLAG)
    assert flag.read_text().strip() == "0"  # certified (written by the provisioning step)
    cluster.wait_owner("lb1", 5)
    since = time.time()
    https = TrafficStream(cluster.lab.client, cluster.https_url, duration=60,
                          **cluster.tls_stream_args())  # fmt: skip
    try:
        https.wait_started()
        for d in DOMAINS:
            cluster.acme.refuse(d)
        try:
            # The file only: HAProxy keeps serving the certificate it loaded.
            Path(cluster.tls_cert_path("lb1")).write_text(_self_signed_placeholder())
            failed = cluster.cert_command("lb1", "renew", check=False)
            assert failed.returncode == 1, failed.stdout
            assert "peer LB takes precedence" in failed.stdout, failed.stdout
            assert flag.read_text().strip() == "1"
            cluster.wait_owner("lb2", 10)
        finally:
            for d in DOMAINS:
                cluster.acme.accept(d)
        issued = cluster.cert_command("lb1", "renew", "--force")
        assert "CA-issued certificate in place" in issued.stdout, issued.stdout
        assert flag.read_text().strip() == "0"
        cluster.wait_owner("lb1", 10)
        time.sleep(0.5)
    finally:
        records = https.stop()
    assert len(records) > 50, len(records)
    # the address moved twice; only a request in flight at a move may fail (one per move)
    moves = cluster.route_moves(since)
    assert len(moves) == 2, moves
    failed = [r for r in records if not r["ok"]]
    assert not [r for r in failed if not at_a_move(r, moves)], failed
    assert len(failed) <= len(moves), failed


def test_http_site_still_answers_on_the_floating_ip_address(cluster: LabCluster) -> None:
    """The floating IP without a name (no SNI) still gets an answer on port 80: a redirect."""
    rec = cluster.get(f"http://{FLOATING_IP}/")
    assert rec["status"] == 301, rec


def test_backends_log_the_real_client_address_over_https(cluster: LabCluster) -> None:
    marker = f"from-https-test-{int(time.time())}"
    for _ in range(2):
        rec = cluster.lab.client.call(fetch, f"{cluster.https_url}?{marker}",
                                      **cluster.tls_stream_args())  # fmt: skip
        assert rec["ok"], rec
    lines = [ln for w in cluster.lab.webs for ln in cluster.access_log(w.name).splitlines()
             if marker in ln]  # fmt: skip
    assert len(lines) == 2, lines
    assert all(ln.startswith(CLIENT_IP + " ") for ln in lines), lines
