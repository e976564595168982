"""``python -m lab.bench_tls`` (in ``make bench``): HTTPS figures from the lab, beside HTTP.

One lab cluster with domains and certificates from the lab's ACME CA (Pebble). Every
figure is a distribution over ``--runs`` runs (JSON lines through ``lab.measure``):

* ``tls_full_handshakes_per_second``: h2load (nghttp2-client) opens ``--handshakes`` new
  TLS connections at once, one request each (h2load never resumes a session, so every
  one is a full ECDHE-ECDSA handshake), to the floating IP; connections/s over the run.
* ``h2_requests_per_second``: h2load, 10 HTTP/2 connections, 10 streams each, over TLS.
* ``h1_tls_requests_per_second``: HTTP/1.1 keep-alive over TLS, 10 connections.
* ``h1_plain_requests_per_second``: the same, plain HTTP on port 80 of the same cluster
  (which answers every request with the redirect: the LB's own cost), and
  ``h1_plain_backend_requests_per_second``: plain HTTP to the site through a cluster
  without domains, started after the first in the same run (the full path, like TLS).
* ``https_failover_haproxy_crash`` / ``https_failover_host_loss``: a stream of new HTTPS
  connections (one every 10 ms) through the floating IP; last success before the fault
  to first success through lb2, and the plain HTTP stream beside it in the same event.

Figures, not assertions: tests/lab/test_https.py asserts the behaviour.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from lab import topology as topo
from lab.cluster import LabCluster, wait_for
from lab.measure import emit, emit_distribution
from lab.netns import requirements_missing
from lab.topology import LabNetwork
from lab.traffic import TrafficStream, outage

DOMAINS = ("site.lab.example", "www.site.lab.example")
TOOLS = ("ip", "haproxy", "keepalived", "apache2", "curl", "h2load", "pebble", "dehydrated")
_FINISHED = re.compile(r"finished in ([0-9.]+)(ms|s), ([0-9.]+) req/s")
_STATUS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed"
)


def h2load(c: LabCluster, url: str, *args: str) -> dict[str, float]:
    """One h2load run from the client namespace against the floating IP."""
    argv = ["h2load", f"--connect-to={topo.FLOATING_IP}", *args, url]
    proc = c.lab.client.run(argv, check=False, timeout=120)
    out = proc.stdout
    finished, status = _FINISHED.search(out), _STATUS.search(out)
    if proc.returncode != 0 or not finished or not status:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {out[-800:]}{proc.stderr[-400:]}")
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return {
        "seconds": seconds,
        "rps": float(finished.group(3)),
        "succeeded": int(status.group(4)),
        "failed": int(status.group(5)),
    }


def _failover(c: LabCluster, fault: str) -> tuple[float, float, int]:
    """HTTP and HTTPS streams through one failover; (http gap, https gap, https failed)."""
    http = TrafficStream(c.lab.client, c.url, duration=25, interval=0.01, timeout=0.2)
    https = TrafficStream(c.lab.client, c.https_url, duration=25, interval=0.01, timeout=0.2,
                          **c.tls_stream_args())  # fmt: skip
    try:
        http.wait_started()
        https.wait_started()
        time.sleep(1.0)
        t0 = time.time()
        c.kill_haproxy("lb1") if fault == "haproxy" else c.vanish("lb1")
        c.wait_owner("lb2", 15)

        def recovered() -> bool:
            recs = [r for r in https.records() if r["ts"] >= t0]
            fails = [r["ts"] for r in recs if not r["ok"]]
            return len([r for r in recs if r["ok"] and (not fails or r["ts"] > fails[-1])]) >= 20

        wait_for(recovered, 15, "HTTPS clients answered through lb2")
    finally:
        h, s = http.stop(), https.stop()
    if fault == "haproxy":
        c.start_haproxy("lb1")
    else:
        c.return_host("lb1")
    c.wait_settled(20)
    gh, gs = outage(h, t0), outage(s, t0)
    return gh.gap, gs.gap, gs.failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_tls", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--failovers", type=int, default=3)
    args = parser.parse_args(argv)
    reason = requirements_missing(TOOLS)
    if reason:
        print(f"bench_tls: cannot run: {reason}", flush=True)
        return 2
    runs = max(1, min(args.runs, 20))
    figures: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        figures.setdefault(name, []).append(value)

    with (
        LabNetwork(web_count=2) as lab,
        LabCluster(lab, domains=DOMAINS, admin_cidrs=(f"{topo.CLIENT_IP}/32",)) as c,
    ):
        https, plain = c.https_url, f"http://{DOMAINS[0]}/"
        for _ in range(runs):
            n = args.handshakes
            hs = h2load(c, https, "-n", str(n), "-c", str(n), "-t", "1", "-m", "1")
            add("tls_full_handshakes_per_second", n / hs["seconds"])
            add("tls_handshake_failed", hs["failed"])
            h2 = h2load(c, https, "-n", str(args.requests), "-c", "10", "-m", "10")
            add("h2_requests_per_second", h2["rps"])
            add("h2_failed", h2["failed"])
            h1s = h2load(c, https, "--h1", "-n", str(args.requests), "-c", "10")
            add("h1_tls_requests_per_second", h1s["rps"])
            h1 = h2load(c, plain, "--h1", "-n", str(args.requests), "-c", "10")
            add("h1_plain_requests_per_second", h1["rps"])
        for fault in ("haproxy", "host"):
            for _ in range(max(1, min(args.failovers, 10))):
                gh, gs, failed = _failover(c, fault)
                label = "haproxy_crash" if fault == "haproxy" else "host_loss"
                add(f"https_failover_{label}", gs)
                add(f"http_failover_{label}_same_event", gh)
                add(f"https_failed_requests_{label}", failed)
    units: dict[str, str] = {"per_second": "1/s", "failover": "s", "failed": "requests"}
    for name, values in figures.items():
        unit = next((u for k, u in units.items() if k in name), "")
        emit_distribution(name, values, unit)
    # the plain-HTTP path with backends, for scale: a cluster without domains
    extra: dict[str, Any] = {}
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        values = []
        for _ in range(runs):
            values.append(h2load(c, c.url, "--h1", "-n", str(args.requests), "-c", "10")["rps"])
        emit_distribution("h1_plain_backend_requests_per_second", values, "1/s", **extra)
    emit("tls_bench_runs", runs, "runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
