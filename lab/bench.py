"""``python -m lab.bench`` (``make bench``): failover figures from the lab, as distributions.

Prints one JSON object per line (``lab.measure``); every failover is repeated ``--runs``
times (default 10), each at a random moment of keepalived's 1 s check cycle (a random
0-1 s wait before the fault), and reported as min/median/p90/max:

* ``failover_haproxy_crash`` / ``failed_requests_haproxy_crash``: HAProxy on the master
  is SIGKILLed under a continuous request stream (one new connection every 10 ms,
  200 ms timeout); failover time = last success before the outage -> first success
  through the new master.
* ``failover_haproxy_stop``: the same with SIGTERM (what ``systemctl stop`` sends).
* ``failover_host_loss`` / ``failed_requests_host_loss``: the master host vanishes
  (every process SIGKILLed, every link down).
* ``failed_requests_web_loss``: one web server's Apache is SIGKILLed and restarted.

Throughput and latency (wrk) are ``lab.bench_http``. Figures, not assertions: the lab
tier (tests/lab) asserts the behaviour.
"""

from __future__ import annotations

import argparse
import random
import signal
import time

from lab import topology as topo
from lab.cluster import LabCluster, wait_for
from lab.measure import emit, emit_distribution
from lab.netns import requirements_missing
from lab.topology import LabNetwork
from lab.traffic import TrafficStream, outage

FAULTS = ("haproxy_crash", "haproxy_stop", "host_loss")


def _inject(c: LabCluster, fault: str) -> None:
    if fault == "haproxy_crash":
        c.kill_haproxy("lb1")
    elif fault == "haproxy_stop":
        c.kill_haproxy("lb1", signal.SIGTERM)
    else:
        c.vanish("lb1")


def _repair(c: LabCluster, fault: str) -> None:
    if fault == "host_loss":
        c.return_host("lb1")
    else:
        c.start_haproxy("lb1")


def failover_once(c: LabCluster, fault: str, rng: random.Random) -> tuple[float, int, float]:
    """One fault on the master at a random moment: (outage s, failed requests, delay s)."""
    stream = TrafficStream(c.lab.client, c.url, duration=25, interval=0.01, timeout=0.2)
    try:
        stream.wait_started()
        delay = rng.uniform(0.0, 1.0)  # keepalived's script checks run once a second
        time.sleep(0.5 + delay)
        t0 = time.time()
        _inject(c, fault)
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
    _repair(c, fault)
    c.wait_settled(20)
    return gap.gap, gap.failed, delay


def _web_loss(c: LabCluster) -> tuple[int, int, float]:
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
    failed = sum(1 for r in records if not r["ok"])
    return failed, len(records), max((r["ms"] for r in records), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="repetitions of each failover")
    parser.add_argument("--web-runs", type=int, default=3, help="repetitions of the web loss")
    parser.add_argument("--faults", nargs="*", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--seed", type=int, default=None, help="random moments (default: new)")
    args = parser.parse_args(argv)
    reason = requirements_missing()
    if reason:
        print(f"bench: cannot run: {reason}", flush=True)
        return 2
    rng = random.Random(args.seed)
    runs = max(1, min(args.runs, 100))
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        for fault in args.faults:
            gaps, failed = [], []
            for _ in range(runs):
                gap, fails, _delay = failover_once(c, fault, rng)
                gaps.append(gap)
                failed.append(fails)
            emit_distribution(f"failover_{fault}", gaps, "s")
            emit_distribution(f"failed_requests_{fault}", failed, "requests")
        web = [_web_loss(c) for _ in range(max(1, min(args.web_runs, 20)))]
        emit_distribution("failed_requests_web_loss", [w[0] for w in web], "requests")
        emit("requests_during_web_loss", sum(w[1] for w in web), "requests")
        emit_distribution("slowest_request_web_loss", [w[2] for w in web], "ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
