"""``python -m lab.bench`` (``make bench``): failover and throughput figures from the lab.

Prints one JSON object per line, ``{"metric": ..., "value": ..., "unit": ...}``:

* ``failover_haproxy_crash`` / ``failed_requests_haproxy_crash``: HAProxy on the master
  is SIGKILLed under a continuous request stream (one new connection every 10 ms,
  200 ms timeout); failover time = last success before the outage -> first success
  through the new master.
* ``failover_host_loss`` / ``failed_requests_host_loss``: the master host vanishes
  (every process SIGKILLed, every link down).
* ``failed_requests_web_loss``: one web server's Apache is SIGKILLed and restarted.
* ``requests_per_second_floating_ip`` / ``requests_per_second_direct_web``: a fixed
  window of requests (4 client threads, one connection per request) from the client
  through the floating IP, and directly to web1 from lb2's namespace (the client has
  no route into the private network, as on Hetzner).

Figures, not assertions: the lab tier (tests/lab) asserts the behaviour.
"""

from __future__ import annotations

import argparse
import threading
import time

from lab import topology as topo
from lab.cluster import LabCluster, wait_for
from lab.measure import emit
from lab.netns import requirements_missing
from lab.topology import LabNetwork
from lab.traffic import TrafficStream, fetch, outage

MAX_WINDOW = 30.0


def throughput(url: str, seconds: float, threads: int = 4) -> dict[str, int]:
    """Requests answered OK within ``seconds`` by ``threads`` client threads (bounded)."""
    seconds = min(seconds, MAX_WINDOW)
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        for _ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            rec = fetch(url, timeout=1.0)
            with lock:
                counts["ok" if rec["ok"] else "failed"] += 1

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 5)
    return counts


def _failover(c: LabCluster, fault: str, label: str) -> None:
    stream = TrafficStream(c.lab.client, c.url, duration=25, interval=0.01, timeout=0.2)
    try:
        stream.wait_started()
        time.sleep(1.0)
        t0 = time.time()
        if fault == "haproxy":
            c.kill_haproxy("lb1")
        else:
            c.vanish("lb1")
        wait_for(
            lambda: c.assigned() == "lb2" and c.lab.floating_ip_target() == "lb2",
            15,
            "floating IP on lb2",
        )

        def recovered() -> bool:
            recs = [r for r in stream.records() if r["ts"] >= t0]
            fails = [r["ts"] for r in recs if not r["ok"]]
            after = [r for r in recs if r["ok"] and (not fails or r["ts"] > fails[-1])]
            return len(after) >= 20

        wait_for(recovered, 15, "clients answered through lb2")
    finally:
        records = stream.stop()
    gap = outage(records, t0)
    emit(f"failover_{label}", round(gap.gap, 3), "s")
    emit(f"failed_requests_{label}", gap.failed, "requests")
    if fault == "haproxy":
        c.start_haproxy("lb1")
    else:
        c.return_host("lb1")
    c.wait_settled(20)


def _web_loss(c: LabCluster) -> None:
    stream = TrafficStream(c.lab.client, c.url, duration=25, interval=0.01, timeout=5.0)
    try:
        stream.wait_started()
        time.sleep(1.0)
        c.kill_apache("web1")
        for lb in topo.LB_NAMES:

            def down(lb: str = lb) -> bool:
                return c.server_status(lb)["web1"].startswith("DOWN")

            wait_for(down, 5, f"web1 DOWN on {lb}")
        time.sleep(1.0)
        c.start_apache("web1")
        wait_for(lambda: c.server_status("lb1")["web1"].startswith("UP"), 5, "web1 UP")
        time.sleep(1.0)
    finally:
        records = stream.stop()
    emit("failed_requests_web_loss", sum(1 for r in records if not r["ok"]), "requests")
    emit("requests_during_web_loss", len(records), "requests")
    emit("slowest_request_web_loss", max((r["ms"] for r in records), default=0.0), "ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput window each")
    args = parser.parse_args(argv)
    reason = requirements_missing()
    if reason:
        print(f"bench: cannot run: {reason}", flush=True)
        return 2
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        _failover(c, "haproxy", "haproxy_crash")
        _failover(c, "host", "host_loss")
        _web_loss(c)
        fip = lab.client.call(throughput, c.url, args.seconds, timeout=args.seconds + 30)
        web1 = f"http://{topo.web_private_ip(1)}/"
        direct = lab["lb2"].call(throughput, web1, args.seconds, timeout=args.seconds + 30)
        emit("requests_per_second_floating_ip", round(fip["ok"] / args.seconds, 1), "req/s")
        emit("requests_per_second_direct_web", round(direct["ok"] / args.seconds, 1), "req/s")
        emit("failed_requests_throughput", fip["failed"] + direct["failed"], "requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
