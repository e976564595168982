"""Lab tier: metrics for Prometheus and webhook alerts, on the real daemons.

One cluster (2 LBs, 2 web servers) whose alert webhook points at a receiver in the
lab's api namespace (the public side, as a real webhook is). Exporters are scraped from a
namespace on the private network; the metrics the README's alert rules use must exist
and follow the cluster's state; from the public side nothing answers on their ports.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from components.render import (
    EVENT_HOOK,
    HAPROXY_METRICS_PORT,
    METRICS_SCRIPT,
    NODE_EXPORTER_PORT,
    OWNERSHIP_CHECK_INTERVAL,
    STATE_DIR,
    TOKEN_FILE,
)
from lab import prom
from lab.cluster import REPO_ROOT, LabCluster, wait_for
from lab.netns import Host, requirements_missing
from lab.probe import tcp_probe
from lab.topology import FLOATING_IP, LB_NAMES, LB_PUBLIC_IPS, LabNetwork
from lab.webhook import WebhookReceiver

pytestmark = pytest.mark.lab
LAB_REASON = requirements_missing(
    ("ip", "haproxy", "keepalived", "apache2", "curl", "prometheus-node-exporter", "openssl")
)


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[LabCluster, WebhookReceiver]]:
    if LAB_REASON:
        pytest.skip(f"LAB TIER NOT RUN: {LAB_REASON}")
    with LabNetwork(web_count=2) as lab:
        receiver = WebhookReceiver(lab.api)
        try:
            with LabCluster(lab, alert_webhook_url=receiver.url) as cluster:
                yield cluster, receiver
        finally:
            receiver.close()


@pytest.fixture
def cluster(env: tuple[LabCluster, WebhookReceiver]) -> Iterator[LabCluster]:
    c, _ = env
    c.wait_settled(20)
    wait_for(lambda: vrrp_master(c, "lb1") == 1.0, 10, "lb1 master in its metrics")
    yield c
    # leave it settled for the next test
    for web in c.lab.webs:
        if not c.running(web.name, "apache2"):
            c.start_apache(web.name)
    for name in LB_NAMES:
        if not c.running(name, "haproxy"):
            c.start_haproxy(name)
            wait_for(lambda n=name: c.haproxy_healthy(n), 10, f"haproxy on {name}")
    c.wait_settled(20)


def readme_metrics() -> set[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Monitoring and alerts", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"\b(?:hcloud_ha_web|haproxy)_[a-z_]+\b", section))
    assert len(names) >= 9, names
    return names


def scraper_for(c: LabCluster, target: str) -> Host:
    """A host on the private network other than the target itself."""
    return c.lab["web2"] if target == "web1" else c.lab["web1"]


def node_metrics(c: LabCluster, name: str) -> list[prom.Sample]:
    ip = c.lab[name].private_ip
    return prom.scrape(scraper_for(c, name), f"http://{ip}:{NODE_EXPORTER_PORT}/metrics")


def haproxy_metrics(c: LabCluster, name: str) -> list[prom.Sample]:
    ip = c.lab[name].private_ip
    return prom.scrape(scraper_for(c, name), f"http://{ip}:{HAPROXY_METRICS_PORT}/metrics")


def vrrp_master(c: LabCluster, name: str) -> float | None:
    return prom.value(node_metrics(c, name), "hcloud_ha_web_vrrp_master", host=name)


def server_up(c: LabCluster, lb: str, web: str) -> float | None:
    samples = haproxy_metrics(c, lb)
    return prom.value(samples, "haproxy_server_status", proxy="web", server=web, state="UP")


def test_every_exporter_answers_on_the_private_network(cluster: LabCluster) -> None:
    # keepalived runs its notify script after a transition, asynchronously: the state
    # reaches the textfile within a moment of the cluster settling, not before.
    wait_for(lambda: vrrp_master(cluster, "lb1") == 1.0, 10, "lb1 master in its metrics")
    wait_for(lambda: vrrp_master(cluster, "lb2") == 0.0, 10, "lb2 backup in its metrics")
    for host in [*cluster.lab.lbs, *cluster.lab.webs]:
        samples = node_metrics(cluster, host.name)
        assert prom.value(samples, "node_exporter_build_info") is not None or any(
            s.name == "node_exporter_build_info" for s in samples
        ), f"{host.name}: no node exporter metrics"
        listening = host.run(["ss", "-Hltn", f"sport = :{NODE_EXPORTER_PORT}"]).stdout.split()
        assert f"{host.private_ip}:{NODE_EXPORTER_PORT}" in listening, listening
    for name in LB_NAMES:
        samples = haproxy_metrics(cluster, name)
        for web in cluster.lab.webs:
            assert server_up(cluster, name, web.name) == 1.0
        assert any(s.name == "haproxy_process_uptime_seconds" for s in samples)
        node = node_metrics(cluster, name)
        for metric in (
            "hcloud_ha_web_vrrp_master",
            "hcloud_ha_web_vrrp_priority",
            "hcloud_ha_web_reboot_required",
        ):
            assert prom.value(node, metric, host=name) is not None, f"{name}: {metric} missing"
    assert prom.value(node_metrics(cluster, "lb1"), "hcloud_ha_web_vrrp_priority") == 150 + 1


def test_nothing_answers_on_the_public_side(cluster: LabCluster) -> None:
    client = cluster.lab.client
    # The probe works: the site answers the client on the floating IP ...
    assert client.call(tcp_probe, FLOATING_IP, 80).outcome == "connected"
    for address in (FLOATING_IP, *LB_PUBLIC_IPS.values()):
        for port in (NODE_EXPORTER_PORT, HAPROXY_METRICS_PORT):
            # ... and each LB's public addresses answer the exporters' ports with a RST:
            # reached, and nothing listens there.
            result = client.call(tcp_probe, address, port)
            assert result.outcome == "refused", str(result)


def test_master_moves_and_metrics_follow_and_the_webhook_hears_it(
    cluster: LabCluster, env: tuple[LabCluster, WebhookReceiver]
) -> None:
    _, receiver = env
    before = len(receiver.kinds())
    transitions = prom.value(
        node_metrics(cluster, "lb2"), "hcloud_ha_web_vrrp_transitions_total", host="lb2"
    )
    cluster.kill_haproxy("lb1")
    wait_for(lambda: cluster.masters() == ["lb2"], 10, "lb2 master")
    wait_for(lambda: vrrp_master(cluster, "lb2") == 1.0, 5, "lb2 master in its metrics")
    lb1 = node_metrics(cluster, "lb1")
    assert prom.value(lb1, "hcloud_ha_web_vrrp_master", host="lb1") == 0.0
    assert prom.value(lb1, "hcloud_ha_web_vrrp_state", host="lb1", state="FAULT") == 1.0
    after = prom.value(
        node_metrics(cluster, "lb2"), "hcloud_ha_web_vrrp_transitions_total", host="lb2"
    )
    assert transitions is not None and after == transitions + 1
    wait_for(
        lambda: ("became_master", "lb2") in receiver.kinds()[before:], 10, "webhook: lb2 master"
    )
    post = next(p for p in receiver.posts[before:] if p["body"]["host"] == "lb2")
    assert post["request"] == f"POST {receiver.path} HTTP/1.1"
    assert post["body"]["cluster"] == "hcloud-ha-web"
    assert post["body"]["detail"]["previous"] == "BACKUP"
    # back: lb1 (higher priority) takes over again, and says so too
    cluster.start_haproxy("lb1")
    wait_for(lambda: cluster.masters() == ["lb1"], 15, "lb1 master again")
    wait_for(lambda: vrrp_master(cluster, "lb1") == 1.0, 5, "lb1 master in its metrics")
    wait_for(
        lambda: ("became_master", "lb1") in receiver.kinds()[before:], 10, "webhook: lb1 master"
    )


def test_backend_down_shows_on_both_haproxies(cluster: LabCluster) -> None:
    cluster.kill_apache("web2")
    for lb in LB_NAMES:
        wait_for(lambda lb=lb: server_up(cluster, lb, "web2") == 0.0, 10, f"web2 DOWN on {lb}")
        assert server_up(cluster, lb, "web1") == 1.0
    cluster.start_apache("web2")
    for lb in LB_NAMES:
        wait_for(lambda lb=lb: server_up(cluster, lb, "web2") == 1.0, 10, f"web2 UP on {lb}")


def run_on_lb(
    cluster: LabCluster, name: str, path: str, *args: str, stdin: str = "", rc: int = 0
) -> float:
    """Run one of the rendered ops programs on ``name``; returns how long it took."""
    started = time.monotonic()
    argv = [str(cluster.hosts[name].root) + path, *args]
    proc = cluster.lab[name].run(argv, input=stdin, timeout=60, check=False)
    assert proc.returncode == rc, f"{argv} exited {proc.returncode}: {proc.stderr}"
    return time.monotonic() - started


def test_failover_outcome_and_certificate_expiry_reach_prometheus(cluster: LabCluster) -> None:
    root = cluster.hosts["lb2"].root
    now = time.time()
    state = {
        "last_claim": {"started": now - 2.5, "ended": now, "result": "gave_up", "attempts": 9},
        "api_auth": "refused",
        "api_auth_checked": now,
    }
    certs = root / "etc/haproxy/certs"
    certs.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "10", "-subj", "/CN=lab.example", "-keyout", str(certs / "k.key"),
         "-out", str(certs / "site.pem")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    state_file = root / STATE_DIR.lstrip("/") / "failover-state.json"
    try:
        # a claim still running (the failover script writes null end and result)
        running = {"last_claim": {"started": now, "ended": None, "result": None, "attempts": 0}}
        state_file.write_text(json.dumps(running))
        run_on_lb(cluster, "lb2", METRICS_SCRIPT, "collect")
        node = node_metrics(cluster, "lb2")
        assert prom.value(node, "hcloud_ha_web_failover_last_claim_result", result="running") == 1
        assert prom.value(node, "hcloud_ha_web_failover_last_claim_duration_seconds") is None
        state_file.write_text(json.dumps(state))
        run_on_lb(cluster, "lb2", METRICS_SCRIPT, "collect")
        node = node_metrics(cluster, "lb2")
        expiry = prom.value(node, "hcloud_ha_web_cert_expiry_timestamp_seconds", cert="site.pem")
        assert expiry is not None and abs(expiry - (now + 10 * 86400)) < 120
        assert prom.value(node, "hcloud_ha_web_failover_last_claim_result", result="gave_up") == 1
        assert prom.value(node, "hcloud_ha_web_failover_last_claim_result", result="assigned") == 0
        duration = prom.value(node, "hcloud_ha_web_failover_last_claim_duration_seconds")
        assert duration == pytest.approx(2.5, abs=0.01)
        assert prom.value(node, "hcloud_ha_web_failover_api_auth", state="refused") == 1
        # Every metric the README names (table, alert rules) exists on a live LB.
        present = {s.name for s in [*node, *haproxy_metrics(cluster, "lb2")]}
        assert readme_metrics() - present == set()
    finally:
        for p in (
            certs / "k.key",
            certs / "site.pem",
            root / STATE_DIR.lstrip("/") / "failover-state.json",
        ):
            p.unlink(missing_ok=True)  # fmt: skip
        run_on_lb(cluster, "lb2", METRICS_SCRIPT, "collect")
    assert (
        prom.value(node_metrics(cluster, "lb2"), "hcloud_ha_web_cert_expiry_timestamp_seconds")
        is None
    )


def test_webhook_retries_then_delivers_and_never_logs_the_url(
    cluster: LabCluster, env: tuple[LabCluster, WebhookReceiver]
) -> None:
    _, receiver = env
    with receiver._lock:
        receiver.fail_first = receiver.requests + 2  # the next two answers are HTTP 500
    before = len(receiver.attempts)
    took = run_on_lb(cluster, "lb1", EVENT_HOOK, "claim_failed", stdin='{"attempts": 3}\n')
    assert took >= 1.4, "two HTTP 500s were not retried with backoff (0.5 s, 1 s)"
    for kind in ("api_auth_refused", "cert_renewal_failed"):
        run_on_lb(cluster, "lb1", EVENT_HOOK, kind, stdin='{"attempts": 3}\n')
    kinds = receiver.kinds()
    for kind in ("claim_failed", "api_auth_refused", "cert_renewal_failed"):
        assert (kind, "lb1") in kinds
    sent = [(a["body"]["kind"], a["body"]["host"]) for a in receiver.attempts[before:]]
    assert sent.count(("claim_failed", "lb1")) == 3  # two answered 500, then delivered
    logged = cluster.ops_log("lb1")
    assert "webhook accepted (HTTP 204, attempt 3)" in logged
    # The secret part of the URL is nowhere in what the hosts logged.
    for path in [*cluster.lab.workdir.rglob("*.log"), *cluster.base.rglob("*.log")]:
        assert receiver.path not in path.read_text(errors="replace"), f"URL leaked into {path}"


def test_the_failover_script_alerts_a_refused_token_and_a_failed_claim(
    cluster: LabCluster, env: tuple[LabCluster, WebhookReceiver]
) -> None:
    """The hardening task's failover script calls this hook; the POSTs reach the webhook."""
    _, receiver = env
    token_files = [cluster.hosts[lb].root / TOKEN_FILE.lstrip("/") for lb in LB_NAMES]
    good = token_files[0].read_text()
    posted = len(receiver.kinds())
    for path in token_files:
        path.write_text("wrong" + good)  # a revoked token, as far as the API can tell
    try:
        # the master's ownership check sees the refusal within a check interval or two
        wait_for(
            lambda: ("api_auth_refused", "lb1") in receiver.kinds()[posted:],
            3 * OWNERSHIP_CHECK_INTERVAL,
            "api_auth_refused from lb1",
        )
        cluster.kill_haproxy("lb1")  # lb2 becomes master; its claim is refused for good
        wait_for(lambda: ("claim_failed", "lb2") in receiver.kinds()[posted:], 15, "claim_failed")
        post = next(p for p in receiver.posts[posted:] if p["body"]["kind"] == "claim_failed")
        assert post["body"]["detail"]["message"].startswith("refused")
        run_on_lb(cluster, "lb2", METRICS_SCRIPT, "collect")
        node = node_metrics(cluster, "lb2")
        assert prom.value(node, "hcloud_ha_web_failover_api_auth", state="refused") == 1
        assert prom.value(node, "hcloud_ha_web_failover_last_claim_result", result="refused") == 1
    finally:
        for path in token_files:
            path.write_text(good)


def test_a_hanging_webhook_does_not_delay_failover(
    cluster: LabCluster, env: tuple[LabCluster, WebhookReceiver]
) -> None:
    _, receiver = env
    posted = len(receiver.kinds())
    receiver.hang = True
    try:
        before = receiver.requests
        killed = time.monotonic()
        cluster.kill_haproxy("lb1")
        cluster.wait_owner("lb2", timeout=10)
        took = time.monotonic() - killed
        # failover with a responsive webhook takes ~1 s here (health script cycle + skew)
        assert took < 3.0, f"failover took {took:.2f}s while the webhook hung"
        wait_for(lambda: receiver.requests > before, 5, "the hook to try the hanging webhook")
    finally:
        receiver.release()
    # the hook's next attempt gets through
    wait_for(lambda: ("became_master", "lb2") in receiver.kinds()[posted:], 10, "lb2's retry")


def test_the_hook_gives_up_after_bounded_attempts(
    cluster: LabCluster, env: tuple[LabCluster, WebhookReceiver]
) -> None:
    _, receiver = env
    with receiver._lock:
        receiver.fail_first = receiver.requests + 1000
    try:
        before = len(receiver.attempts)
        took = run_on_lb(cluster, "lb2", EVENT_HOOK, "claim_failed", stdin="{}\n", rc=1)
        sent = [(a["body"]["kind"], a["body"]["host"]) for a in receiver.attempts[before:]]
        assert sent.count(("claim_failed", "lb2")) == 5
        assert took < 15, f"the hook took {took:.1f}s"
        assert "claim_failed: webhook failed after 5 attempts (last: HTTP 500)" in cluster.ops_log(
            "lb2"
        )
    finally:
        with receiver._lock:
            receiver.fail_first = 0
