"""Checks of the site's behaviour shared by the lab tier and the local cloud tier.

Each takes a `lab.cluster.ClusterView` (daemons run by the lab, or by systemd on booted
Debian hosts) and raises AssertionError, naming what it saw, when the behaviour is off.
"""

from __future__ import annotations

import itertools

from lab.cluster import ClusterView


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
        assert served == {owner}, (cookie, served)
