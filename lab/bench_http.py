"""``python -m lab.bench_http``: throughput, latency and CPU per request, measured with wrk.

In one lab, alternating run by run so a busy moment hits both sides alike:

* ``floating_ip``: wrk on the client, through the floating IP (lb1's HAProxy, then
  Apache on the web servers);
* ``direct``: wrk on lb2 straight to web1's Apache (the client has no route into the
  private network, as on Hetzner);

each with keep-alive (``keepalive``) and with a new connection per request (``close``,
``-H 'Connection: close'``). Per mode it prints the distributions (over ``--runs``) of
requests/s, p50 and p99 latency, the ratio floating IP / direct (run by run), and CPU
time per request of HAProxy (lb1), Apache (all web servers) and wrk itself, from
/proc/<pid>/stat before and after (utime+stime of the live processes plus what their
reaped children used), so the 2 cores' budget is visible process by process, and the
ratio those CPU costs allow at best when wrk, HAProxy and Apache share the cores
(``http_rps_ratio_cpu_ceiling_*``: direct cost / (direct cost + HAProxy's cost)).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass

from lab import topology as topo
from lab.cluster import LabCluster
from lab.measure import emit, emit_distribution
from lab.netns import Host, netns_pids, requirements_missing, which
from lab.topology import LabNetwork

CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_SECONDS = 30.0
MODES = {"keepalive": [], "close": ["-H", "Connection: close"]}
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}
_LATENCY_RE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float


def parse_wrk(out: str) -> dict[str, float]:
    """requests, requests/s, p50/p99 latency (ms) and errors from ``wrk --latency``."""
    lat = {q: float(v) * _UNITS[u] for q, v, u in _LATENCY_RE.findall(out)}
    reqs = re.search(r"^\s*(\d+) requests in", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not (reqs and rps and "50" in lat and "99" in lat):
        raise ValueError(f"unexpected wrk output: {out[-600:]!r}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    errors += int(non2xx.group(1)) if non2xx else 0
    return {
        "requests": float(reqs.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": lat["50"],
        "p99_ms": lat["99"],
        "errors": float(errors),
    }


def cpu_seconds(pids: list[int], comm: str) -> float:
    """CPU seconds used by the processes named ``comm`` among ``pids`` (and their reaped
    children), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name != comm:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[11..14] are utime, stime, cutime, cstime (stat fields 14-17)
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def wrk(host: Host, url: str, mode: str, seconds: float, conns: int, threads: int) -> WrkResult:
    seconds = min(seconds, MAX_SECONDS)
    argv = ["wrk", "--latency", "-t", str(threads), "-c", str(conns), "-d", f"{seconds:g}s"]
    argv += [*MODES[mode], url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = host.run(argv, timeout=seconds + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    fig = parse_wrk(proc.stdout)
    return WrkResult(
        int(fig["requests"]), fig["rps"], fig["p50_ms"], fig["p99_ms"], int(fig["errors"]), used
    )


def _per_request_us(seconds: float, requests: int) -> float:
    return round(seconds / max(requests, 1) * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_http", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs per target and mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="wrk duration of one run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    args = parser.parse_args(argv)
    reason = requirements_missing() or (None if which("wrk") else "wrk is not installed")
    if reason:
        print(f"bench_http: cannot run: {reason}", flush=True)
        return 2
    runs = max(1, min(args.runs, 50))
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        targets = {
            "floating_ip": (lab.client, c.url),
            "direct": (lab["lb2"], f"http://{topo.web_private_ip(1)}/"),
        }
        web_ns = [w.ns for w in lab.webs]
        for mode in MODES:
            res: dict[str, list[WrkResult]] = {t: [] for t in targets}
            cpu: dict[str, list[float]] = {}
            for _ in range(runs):
                for target, (host, url) in targets.items():
                    lb_pids = netns_pids(lab["lb1"].ns)
                    web_pids = [p for ns in web_ns for p in netns_pids(ns)]
                    h0, a0 = cpu_seconds(lb_pids, "haproxy"), cpu_seconds(web_pids, "apache2")
                    r = wrk(host, url, mode, args.seconds, args.connections, args.threads)
                    lb_pids = sorted(set(lb_pids) | set(netns_pids(lab["lb1"].ns)))
                    web_pids = sorted(set(web_pids) | {p for ns in web_ns for p in netns_pids(ns)})
                    h1, a1 = cpu_seconds(lb_pids, "haproxy"), cpu_seconds(web_pids, "apache2")
                    res[target].append(r)
                    used = {"haproxy": h1 - h0, "apache2": a1 - a0, "wrk": r.cpu_s}
                    for proc, secs in used.items():
                        key = f"{proc}_{target}"
                        cpu.setdefault(key, []).append(_per_request_us(secs, r.requests))
                    time.sleep(0.5)
            for target, rs in res.items():
                emit_distribution(f"http_rps_{target}_{mode}", [r.rps for r in rs], "req/s")
                emit_distribution(f"http_p50_{target}_{mode}", [r.p50_ms for r in rs], "ms")
                emit_distribution(f"http_p99_{target}_{mode}", [r.p99_ms for r in rs], "ms")
                emit(f"http_errors_{target}_{mode}", sum(r.errors for r in rs), "requests")
            ratios = [f.rps / d.rps for f, d in zip(res["floating_ip"], res["direct"], strict=True)]
            emit_distribution(f"http_rps_ratio_{mode}", ratios, "floating_ip/direct")
            for proc, values in cpu.items():
                emit_distribution(f"cpu_per_request_{proc}_{mode}", values, "us")
            # With every core busy, throughput ~ cores / CPU per request. Even if Apache
            # cost as much per request behind HAProxy as it does direct, the floating IP
            # path adds HAProxy's CPU: this is the best ratio those costs allow.
            ceiling = [
                (ad + wd) / (ad + wd + hf)
                for ad, wd, hf in zip(
                    cpu["apache2_direct"],
                    cpu["wrk_direct"],
                    cpu["haproxy_floating_ip"],
                    strict=True,
                )
            ]
            emit_distribution(f"http_rps_ratio_cpu_ceiling_{mode}", ceiling, "floating_ip/direct")
            emit(
                f"http_conditions_{mode}",
                {
                    "connections": args.connections,
                    "wrk_threads": args.threads,
                    "seconds": args.seconds,
                    "cores": os.cpu_count(),
                    "median_rps_direct": statistics.median(r.rps for r in res["direct"]),
                },
                "",
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
