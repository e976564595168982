"""Checks of the site's behaviour shared by the lab tier and the local cloud tier.

Each takes a `lab.cluster.ClusterView` (daemons run by the lab, or by systemd on booted
Debian hosts) and raises AssertionError, naming what it saw, when the behaviour is off.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial

from lab.cluster import ClusterView, assign_calls, wait_for
from lab.topology import LB_NAMES, LB_SERVER_IDS
from lab.traffic import Outage, TrafficStream, outage


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
) -> Outage:
    """Under a steady stream of new clients, ``fail()`` takes lb1 (the master) out: lb2
    becomes the only VRRP master, the fake API is asked to assign the floating IP to lb2
    and only to lb2, the client's route follows, and clients get answers again within 5 s.

    With ``recover``: it brings lb1 back, lb1 takes over again with exactly one successful
    assign to itself, and the last request succeeds. Returns the outage the clients saw.
    """
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
