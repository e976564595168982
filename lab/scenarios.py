"""Checks of the site's behaviour shared by the lab tier and the local cloud tier.

Each takes a `lab.cluster.ClusterView` (daemons run by the lab, or by systemd on booted
Debian hosts) and raises AssertionError, naming what it saw, when the behaviour is off.
"""

from __future__ import annotations

import itertools
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial

from lab.cluster import ClusterView, assign_calls, wait_for
from lab.topology import FLOATING_IP, LB_NAMES, LB_SERVER_IDS
from lab.traffic import Outage, TrafficStream, fetch, outage


def check_round_robin(c: ClusterView, rounds: int = 3) -> None:
    """New clients (no cookie) alternate over the web servers, each getting its share."""
    webs = sorted(w.name for w in c.lab.webs)
    served = [c.get()["served_by"] for _ in range(rounds * len(webs))]
    assert sorted(served) == sorted(webs * rounds), served
    assert all(a != b for a, b in itertools.pairwise(served)), served


def check_sticky(c: ClusterView, cookie_mode: str) -> None:
    """Each server hands out its own cookie, and a client sending it stays on that server."""
    assert cookie_mode in ("prefix", "insert"), cookie_mode
    assert c.settings is not None
    name = c.settings.cookie_name
    for _ in range(2):  # a fresh client each time: one per server in round robin
        first = c.get()
        assert first["ok"], first
        owner = first["served_by"]
        cookie = (first.get("set_cookie") or "").split(";", 1)[0]
        assert cookie.startswith(f"{name}={owner}"), first
        if cookie_mode == "prefix":  # the application's cookie, prefixed: web1~<id>
            assert cookie.startswith(f"{name}={owner}~") and len(cookie) > 20, cookie
        else:  # HAProxy's own cookie holds just the server id
            assert cookie == f"{name}={owner}", cookie
        served = {c.get(cookie=cookie)["served_by"] for _ in range(6)}
        assert served == {owner}, (cookie, served, {lb: c.server_status(lb) for lb in LB_NAMES})


def check_web_server_loss(
    c: ClusterView,
    fail: Callable[[], None],
    recover: Callable[[], None],
    web: str = "web1",
    timeout: float = 10.0,
) -> None:
    """Under a steady stream of new clients, ``fail()`` takes ``web`` down: every LB marks
    it DOWN, the other servers answer everything meanwhile, ``recover()`` brings it back
    into rotation, and not one request fails.

    A request caught by a crash is retried by HAProxy after its 1 s turn-around timer
    (then redispatched): slow, not failed - so each client waits up to 5 s, as a browser
    would.
    """
    others = {w.name for w in c.lab.webs} - {web}
    stream = TrafficStream(c.lab.client, c.url, duration=30, timeout=5.0)
    try:
        stream.wait_started()
        time.sleep(0.3)
        fail()
        failed_at = time.time()
        for lb in LB_NAMES:
            wait_for(partial(_is_down, c, lb, web), timeout, f"{web} DOWN on {lb}", step=0.1)
        time.sleep(0.5)
        recovered_at = time.time()
        recover()
        wait_for(lambda: c.server_status("lb1")[web].startswith("UP"), timeout, f"{web} UP")
        back = time.time()
        wait_for(
            lambda: any(r["served_by"] == web and r["ts"] > back for r in stream.records()),
            timeout,
            f"{web} serving again",
        )
    finally:
        records = stream.stop()
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed[:5]
    during = [r for r in records if failed_at < r["ts"] < recovered_at]
    assert during and {r["served_by"] for r in during} == others, during[:5]


def check_lb_failover(
    c: ClusterView,
    fail: Callable[[], None],
    recover: Callable[[], None] | None = None,
    timeout: float = 15.0,
    https: bool = False,
) -> Outage:
    """Under a steady stream of new clients, ``fail()`` takes lb1 (the master) out: lb2
    becomes the only VRRP master, the fake API is asked to assign the floating IP to lb2
    and only to lb2, the client's route follows, and clients get answers again within 5 s.

    With ``recover``: it brings lb1 back, lb1 takes over again with exactly one successful
    assign to itself, and the last request succeeds. Returns the outage the clients saw.
    """
    if https:
        stream = TrafficStream(c.lab.client, c.https_url, duration=60, **c.tls_stream_args())
    else:
        stream = TrafficStream(c.lab.client, c.url, duration=60)
    try:
        stream.wait_started()
        time.sleep(0.3)
        t0 = time.time()
        fail()
        c.wait_owner("lb2", timeout)
        wait_for(lambda: c.masters() == ["lb2"], timeout, "lb2 sole VRRP master")
        stream.wait_recovered(t0, timeout)
        posts = assign_calls(c.api_calls(t0))
        if recover is not None:
            t1 = time.time()
            recover()
            c.wait_settled(timeout * 2)
            time.sleep(1.0)  # a quiet window: nothing may move any more
    finally:
        records = stream.stop()
    assert [p["server"] for p in posts if p["status"] == 201] == [LB_SERVER_IDS["lb2"]], posts
    assert all(p["server"] == LB_SERVER_IDS["lb2"] for p in posts), posts
    gap = outage(records, t0)
    assert gap.recovered and gap.gap < 5.0, gap
    if recover is not None:
        back = [p for p in assign_calls(c.api_calls(t1)) if p["status"] == 201]
        assert [p["server"] for p in back] == [LB_SERVER_IDS["lb1"]], back
        assert records[-1]["ok"], records[-3:]
    return gap


def _is_down(c: ClusterView, lb: str, web: str) -> bool:
    return c.server_status(lb)[web].startswith("DOWN")


# --- HTTPS (issue 11) ------------------------------------------------------------------------


def curl(c: ClusterView, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """curl from the client namespace; every domain resolves to the floating IP, as DNS says."""
    resolve = [
        a for d in c.domains for p in (80, 443) for a in ("--resolve", f"{d}:{p}:{FLOATING_IP}")
    ]
    return c.lab.client.run(
        ["curl", "-sS", "--max-time", str(timeout - 2), *resolve, *args],
        check=False,
        timeout=timeout,
    )


def check_https_served_by(c: ClusterView, lb: str) -> dict[str, str]:
    """``lb`` serves a certificate for every domain that verifies against the CA's issuing
    root with the real host name (the client is routed to ``lb`` for the check), over
    HTTP/2, and it is the certificate HAProxy's runtime API reports. Returns that."""
    served = c.served_cert(lb)
    previous = c.lab.floating_ip_target()
    c.lab.route_floating_ip_to(lb)
    try:
        for domain in c.domains:
            out = curl(c, "--cacert", c.issuing_root, "-o", "/dev/null",
                       "-w", "%{http_code} %{http_version} %{ssl_verify_result}",
                       f"https://{domain}/")  # fmt: skip
            assert out.returncode == 0 and out.stdout == "200 2 0", (lb, domain, out)
            rec = c.lab.client.call(fetch, f"https://{domain}/", **c.tls_stream_args())
            assert rec["ok"] and rec["cert_serial"] == served["Serial"], (lb, rec, served)
    finally:
        if previous:
            c.lab.route_floating_ip_to(previous)
    assert set(c.domains) <= {
        n.strip().removeprefix("DNS:") for n in served["Subject Alternative Name"].split(",")
    }, served
    assert served["Algorithm"] == "EC256", served  # ECDSA P-256
    assert served["Issuer"] != served["Subject"], served  # not the placeholder
    return served


def check_redirect_except_challenge(c: ClusterView, thumbprint: str) -> None:
    """Port 80 answers 301 to the same URL on https, except the ACME challenge path, which
    HAProxy answers itself with ``<token>.<account thumbprint>``."""
    domain = c.domains[-1]
    out = curl(c, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
               f"http://{domain}/some/page?x=1")  # fmt: skip
    assert out.stdout == f"301 https://{domain}/some/page?x=1", out
    stats = curl(c, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                 f"http://{domain}/haproxy?stats")  # fmt: skip
    assert stats.stdout == f"301 https://{domain}/haproxy?stats", stats  # never over HTTP
    token = "Tok_en-" + str(int(time.time()))
    answer = curl(c, "-w", " %{http_code}", f"http://{domain}/.well-known/acme-challenge/{token}")
    assert answer.stdout == f"{token}.{thumbprint} 200", answer


def check_tls_protocols(c: ClusterView) -> None:
    """TLS 1.0 and 1.1 are refused by the server (alert protocol_version after our
    ClientHello); the same probe with TLS 1.2 and 1.3 succeeds, and a TLS 1.2 session is
    resumed from the session cache."""

    def s_client(*args: str) -> subprocess.CompletedProcess[str]:
        return c.lab.client.run(
            ["openssl", "s_client", "-connect", f"{FLOATING_IP}:443",
             "-servername", c.domains[0], "-cipher", "DEFAULT@SECLEVEL=0", *args],
            check=False, input="", timeout=10,
        )  # fmt: skip

    for old in ("-tls1", "-tls1_1"):
        out = s_client(old)
        assert out.returncode != 0, (old, out.stdout[-400:])
        assert "alert protocol version" in out.stderr, (old, out.stderr)  # the server said no
    for good, name in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        out = s_client(good)
        assert out.returncode == 0 and f"{name}" in out.stdout, (good, out.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        sess = f"{tmp}/session.pem"
        first = s_client("-tls1_2", "-sess_out", sess)
        again = s_client("-tls1_2", "-sess_in", sess)
    assert "New, TLSv1.2" in first.stdout, first.stdout[-300:]
    assert "Reused, TLSv1.2" in again.stdout, again.stdout[-300:]


def check_renewal_under_load(c: ClusterView, lb: str = "lb1") -> None:
    """A forced renewal on the master, under a steady HTTPS stream of new connections:
    not one request fails, and the stream sees the old and then the new certificate."""
    before = c.served_cert(lb)["Serial"]
    stream = TrafficStream(c.lab.client, c.https_url, duration=30, timeout=2.0,
                           **c.tls_stream_args())  # fmt: skip
    try:
        stream.wait_started()
        time.sleep(0.5)
        c.cert_command(lb, "renew", "--force")
        after = c.served_cert(lb)["Serial"]
        assert after != before, (before, after)
        wait_for(lambda: any(r.get("cert_serial") == after for r in stream.records()),
                 10, "the stream to see the new certificate")  # fmt: skip
        time.sleep(0.5)
    finally:
        records = stream.stop()
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed[:5]
    serials = [r.get("cert_serial") for r in records]
    assert serials[0] == before and serials[-1] == after, (before, after, set(serials))
    assert len(records) > 20, len(records)


def check_backup_renews_while_master_holds_ip(c: ClusterView) -> None:
    """lb2 renews (forced) while lb1 is master and the floating IP routes to lb1; its
    HAProxy then serves the new certificate, and lb1's is untouched."""
    assert c.masters() == ["lb1"] and c.lab.floating_ip_target() == "lb1"
    lb1_before = c.served_cert("lb1")["Serial"]
    lb2_before = c.served_cert("lb2")["Serial"]
    c.cert_command("lb2", "renew", "--force")
    assert c.masters() == ["lb1"] and c.lab.floating_ip_target() == "lb1"
    assert c.served_cert("lb1")["Serial"] == lb1_before
    assert c.served_cert("lb2")["Serial"] != lb2_before
    check_https_served_by(c, "lb2")
