"""``python -m lab.soak`` (``make soak``): a chaos soak of the lab cluster.

Continuous traffic from the client while a random fault is injected every few seconds:

* ``haproxy_crash``: SIGKILL to HAProxy on the current master, started again;
* ``lb_host_loss``: an LB (the master more often than not) vanishes and returns;
* ``web_crash``: a web server's Apache is SIGKILLed and started again (0 failed requests
  is an invariant: HAProxy retries and redispatches);
* ``split_brain``: VRRP between the LBs is cut for 1-2 s, then healed;
* ``api_errors``: the next 1-3 fault kinds of the fake API's whole list (locked,
  rate_limit, conflict, server_error, unavailable, timeout, drop, action_error, taken
  in turn so a long run uses all) are queued, then the master's HAProxy crashes, so the
  new master's claim has to get through them;
* ``api_slow``: the API answers the claim 2 s late, same trigger.

After each fault heals, within a bounded wait, these invariants must hold: exactly one
LB is VRRP master (lb1, whose higher priority preempts once it is healthy again) and the
API routes the floating IP to it (and the client's route
follows); every backend is UP on both LBs; nothing keeps retrying (no assign call
during a 2 s quiet window and no failover script still claiming after it; fault kinds
a claim did not need are cleared and printed); no request failed during a web crash.
At the end it prints (JSON lines, ``lab.measure``) the failed requests per fault kind,
the longest outage and every invariant broken, and exits 1 if one was.

``--calm`` injects nothing: wrk loads the floating IP for the whole duration and
the VRRP transitions and assign calls are counted; any is a false failover.
"""

from __future__ import annotations

import argparse
import itertools
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lab import topology as topo
from lab.cluster import LabCluster, assign_calls, wait_for
from lab.fake_hcloud import ERROR_FAULTS
from lab.measure import emit, emit_distribution
from lab.netns import netns_pids, requirements_missing, which
from lab.topology import LabNetwork
from lab.traffic import TrafficStream

KINDS = ("haproxy_crash", "lb_host_loss", "web_crash", "split_brain", "api_errors", "api_slow")
API_FAULT_KINDS = (*ERROR_FAULTS, "drop", "action_error")
SETTLE_TIMEOUT = 40.0
QUIET_WINDOW = 2.0
SLOW_API_SECONDS = 2.0
MAX_DURATION = 4 * 3600.0
MAX_FAULTS = 5000


@dataclass
class Report:
    failed: dict[str, list[int]] = field(default_factory=dict)
    outages: dict[str, list[float]] = field(default_factory=dict)
    broken: list[dict[str, Any]] = field(default_factory=list)

    def record(self, kind: str, failed: int, gap: float) -> None:
        self.failed.setdefault(kind, []).append(failed)
        self.outages.setdefault(kind, []).append(gap)

    def breach(self, kind: str, seq: int, what: str, detail: str = "") -> None:
        self.broken.append({"fault": kind, "seq": seq, "invariant": what, "detail": detail})
        print(f"soak: #{seq} {kind}: INVARIANT BROKEN: {what}\n{detail}", flush=True)


def longest_gap(records: list[dict[str, Any]], since: float) -> float:
    """The longest stretch without an answer that holds failures: last success before a
    failure -> next success (a failover and a later failback are two outages, not one)."""
    longest, last_ok, failing_since = 0.0, since, None
    for r in sorted(records, key=lambda r: r["ts"]):
        if r["ok"]:
            if failing_since is not None:
                longest = max(longest, r["ts"] - failing_since)
            last_ok, failing_since = r["ts"], None
        elif r["ts"] >= since and failing_since is None:
            failing_since = last_ok
    if failing_since is not None:
        return float("inf")
    return longest


class Soak:
    def __init__(self, c: LabCluster, rng: random.Random) -> None:
        self.c = c
        self.rng = rng
        self.api_faults = itertools.cycle(API_FAULT_KINDS)
        assert c.api is not None
        self.api = c.api.client

    def master(self) -> str:
        masters = self.c.masters()
        return masters[0] if len(masters) == 1 else "lb1"

    # -- faults: each returns the function that heals it --------------------------------
    def haproxy_crash(self) -> Callable[[], None]:
        lb = self.master()
        self.c.kill_haproxy(lb)
        time.sleep(self.rng.uniform(0.5, 2.0))
        return lambda: self.c.start_haproxy(lb)

    def lb_host_loss(self) -> Callable[[], None]:
        lb = self.master() if self.rng.random() < 0.75 else self.rng.choice(topo.LB_NAMES)
        self.c.vanish(lb)
        time.sleep(self.rng.uniform(1.0, 3.0))
        return lambda: self.c.return_host(lb)

    def web_crash(self) -> Callable[[], None]:
        web = self.rng.choice([w.name for w in self.c.lab.webs])
        self.c.kill_apache(web)
        wait_for(
            lambda: all(self.c.server_status(lb)[web].startswith("DOWN") for lb in topo.LB_NAMES),
            10,
            f"{web} DOWN on both LBs",
        )
        time.sleep(self.rng.uniform(0.2, 1.0))
        return lambda: self.c.start_apache(web)

    def split_brain(self) -> Callable[[], None]:
        self.c.partition_lbs()
        time.sleep(self.rng.uniform(1.0, 2.0))
        return self.c.heal_lbs

    def api_errors(self) -> Callable[[], None]:
        faults = [next(self.api_faults) for _ in range(self.rng.randint(1, 3))]
        self.api.set_faults(faults)
        print(f"soak:   API faults queued: {faults}", flush=True)
        return self.haproxy_crash()

    def api_slow(self) -> Callable[[], None]:
        self.api.set_faults([{"kind": "slow", "seconds": SLOW_API_SECONDS}])
        heal_crash = self.haproxy_crash()

        def heal() -> None:
            heal_crash()
            # An assign the API held back lands up to SLOW_API_SECONDS after it was sent,
            # so it may land after lb1 has taken the IP back: the fault is over only then.
            # lb1's ownership check (every 5 s) then claims the IP again, within the
            # settle timeout; the invariants are checked after that.
            time.sleep(SLOW_API_SECONDS + 0.5)

        return heal

    # -- invariants ----------------------------------------------------------------------
    def settled(self) -> bool:
        """Exactly one master, the API routes the IP to it, every backend UP. Once all is
        healed that master is lb1: the higher priority preempts (a BACKUP lb2 alone would
        be a state on its way to change, not a settled one)."""
        c = self.c
        masters = c.masters()
        if masters != ["lb1"]:
            return False
        owner = masters[0]
        return (
            c.assigned() == owner
            and c.lab.floating_ip_target() == owner
            and all(c.running(lb, "haproxy") and c.backends_up(lb) for lb in topo.LB_NAMES)
        )

    def check(self, kind: str, seq: int, report: Report) -> None:
        try:
            wait_for(self.settled, SETTLE_TIMEOUT, "one master, owning the IP, all backends UP")
        except TimeoutError as exc:
            report.breach(kind, seq, "settle", f"{exc}\n{self.c.describe()}")
            return
        t0 = time.time()
        time.sleep(QUIET_WINDOW)
        posts = assign_calls(self.c.api_calls(t0))
        if posts:
            report.breach(kind, seq, "quiet: assign calls after settling", str(posts[:5]))
        left = self.api.faults()
        if left:
            # Not a breach: a claim cut short by lb1's return needs no more calls (lb1
            # still owns the IP, its claim sees that with a GET and posts nothing).
            print(f"soak:   API faults left unused: {[f['kind'] for f in left]}", flush=True)
            self.api.clear_faults()
        claims = self.running_claims()
        if claims:
            report.breach(kind, seq, "quiet: a failover script still claims", str(claims))
        if not self.settled():
            report.breach(kind, seq, "stable: state moved in the quiet window", self.c.describe())

    def running_claims(self) -> list[str]:
        """Failover script processes still claiming the IP, on either LB."""
        found = []
        for lb in topo.LB_NAMES:
            for pid in netns_pids(self.c.lab[lb].ns):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if any(a.endswith(b"hcloud-floating-ip") for a in argv) and b"claim" in argv:
                    found.append(f"{lb}:{pid}")
        return found

    def repair(self) -> None:
        """After a broken invariant: bring every daemon back so the soak can go on."""
        self.c.heal_lbs()
        self.api.clear_faults()
        for lb in topo.LB_NAMES:
            if not self.c.running(lb, "keepalived"):
                self.c.return_host(lb)
            elif not self.c.running(lb, "haproxy"):
                self.c.start_haproxy(lb)
        for web in self.c.lab.webs:
            if not self.c.running(web.name, "apache2"):
                self.c.start_apache(web.name)

    def one(self, kind: str, seq: int, report: Report) -> None:
        timeout = 5.0 if kind == "web_crash" else 0.5
        stream = TrafficStream(
            self.c.lab.client, self.c.url, duration=120, count=20_000, interval=0.02,
            timeout=timeout,
        )  # fmt: skip
        heal: Callable[[], None] | None = None
        t0 = time.time()
        try:
            stream.wait_started()
            time.sleep(self.rng.uniform(0.3, 1.5))
            t0 = time.time()
            heal = getattr(self, kind)()
            heal()
            heal = None
            self.check(kind, seq, report)
        except (TimeoutError, OSError) as exc:
            report.breach(kind, seq, "fault step failed", f"{exc}\n{self.c.describe()}")
        finally:
            if heal is not None:
                heal()
            records = stream.stop()
        failed = sum(1 for r in records if not r["ok"] and r["ts"] >= t0)
        gap = longest_gap(records, t0)
        report.record(kind, failed, gap)
        print(
            f"soak: #{seq} {kind}: {failed} failed of {len(records)}, longest outage {gap:.3f} s",
            flush=True,
        )
        if kind == "web_crash" and failed:
            report.breach(kind, seq, "web crash failed requests", f"{failed} failed")
        if gap == float("inf"):
            report.breach(kind, seq, "traffic never answered again", self.c.describe())
        if report.broken and report.broken[-1]["seq"] == seq:
            self.repair()


def soak(c: LabCluster, duration: float, rng: random.Random, kinds: tuple[str, ...]) -> Report:
    s = Soak(c, rng)
    report = Report()
    deadline = time.monotonic() + duration
    # Every kind once (shuffled) before any repeats, so a short run covers them all.
    order = list(kinds)
    rng.shuffle(order)
    for seq in range(MAX_FAULTS):
        if time.monotonic() >= deadline:
            break
        kind = order[seq] if seq < len(order) else rng.choice(kinds)
        s.one(kind, seq, report)
    return report


STATES = ("MASTER", "BACKUP", "FAULT")


def _entered(c: LabCluster) -> dict[str, dict[str, int]]:
    return {lb: {st: c.vrrp_transitions(lb, st) for st in STATES} for lb in topo.LB_NAMES}


def calm(c: LabCluster, duration: float, connections: int, nice: int = 0) -> int:
    """Load without faults; returns the false failovers seen: lb1 leaving MASTER, lb2
    entering MASTER or either entering FAULT (keepalived's log), and assign calls."""
    wait_for(lambda: c.vrrp_transitions("lb2", "BACKUP") >= 1, 10, "lb2 logged BACKUP")
    time.sleep(1.0)
    before = _entered(c)
    t0 = time.time()
    deadline = time.monotonic() + duration
    requests = 0
    for _ in range(int(duration / 30) + 2):
        left = deadline - time.monotonic()
        if left <= 1:
            break
        chunk = min(30.0, left)
        # niced: the load must not starve the LBs' keepalived of CPU more than a real
        # neighbour would, only keep HAProxy and Apache busy
        argv = ["nice", "-n", str(nice), "wrk", "-t", "1", "-c", str(connections)]
        argv += ["-d", f"{chunk:.0f}s", c.url]
        proc = c.lab.client.run(argv, timeout=chunk + 30, check=False)
        for line in proc.stdout.splitlines():
            if " requests in " in line:
                requests += int(line.split()[0])
    moves = len(assign_calls(c.api_calls(t0)))
    after = _entered(c)
    entered = {lb: {st: after[lb][st] - before[lb][st] for st in STATES} for lb in after}
    false = (
        entered["lb1"]["BACKUP"] + entered["lb2"]["MASTER"]
        + entered["lb1"]["FAULT"] + entered["lb2"]["FAULT"]
    )  # fmt: skip
    emit("calm_vrrp_states_entered", entered, "transitions", seconds=duration)
    emit("calm_assign_calls", moves, "calls", seconds=duration)
    emit("calm_requests", requests, "requests", seconds=duration, connections=connections)
    emit("calm_false_failovers", false + moves, "events", seconds=duration)
    return false + moves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS))
    parser.add_argument("--calm", action="store_true", help="no faults: count false failovers")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (--calm)")
    parser.add_argument("--nice", type=int, default=0, choices=range(20), help="wrk's niceness")
    args = parser.parse_args(argv)
    reason = requirements_missing()
    if args.calm and not reason and not which("wrk"):
        reason = "wrk is not installed"
    if reason:
        print(f"soak: cannot run: {reason}", flush=True)
        return 2
    duration = max(1.0, min(args.duration, MAX_DURATION))
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"soak: {duration:g} s, seed {seed}", flush=True)
    started = time.monotonic()
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        if args.calm:
            false = calm(c, duration, args.connections, args.nice)
            return 1 if false else 0
        report = soak(c, duration, random.Random(seed), tuple(args.kinds))
    for kind in sorted(report.failed):
        emit_distribution(f"soak_failed_requests_{kind}", report.failed[kind], "requests")
        emit_distribution(f"soak_outage_{kind}", report.outages[kind], "s")
    longest = max((g for gs in report.outages.values() for g in gs), default=0.0)
    emit("soak_longest_outage", round(longest, 3), "s")
    emit("soak_faults", sum(len(v) for v in report.failed.values()), "faults",
         seconds=round(time.monotonic() - started, 1), seed=seed)  # fmt: skip
    emit("soak_invariants_broken", report.broken, "list")
    return 1 if report.broken else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.TimeoutExpired as exc:
        print(f"soak: a command timed out: {exc}", flush=True)
        raise SystemExit(1) from None
