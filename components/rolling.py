"""Rolling changes: which web servers may be out of service at the same moment.

Day-2 changes (settings, releases) go through the web servers in waves: a wave starts
only when the previous one is ready again, so at most one wave is out at any moment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Default share of the web servers that may be out at once (at least two waves).
DEFAULT_MAX_UNAVAILABLE = 0.5


def web_waves(
    web_names: Sequence[str], max_unavailable: float = DEFAULT_MAX_UNAVAILABLE
) -> tuple[tuple[str, ...], ...]:
    """Split `web_names` (in order) into waves of at most `max_unavailable` of them.

    At least one server per wave, and at least two waves whenever there are two or more
    servers, so a change never takes every web server out at the same moment.
    """
    if not 0 < max_unavailable <= 1:
        raise ValueError(f"max_unavailable must be in (0, 1], not {max_unavailable}")
    count = len(web_names)
    if count == 0:
        return ()
    size = max(1, math.floor(count * max_unavailable))
    if count > 1:
        size = min(size, count - 1)
    return tuple(tuple(web_names[i : i + size]) for i in range(0, count, size))


def lb_order(lb_names: Sequence[str]) -> tuple[str, ...]:
    """The order a rolling change goes through the LBs: the backup (lb2) first, so the
    master keeps the floating IP until its peer is ready again, then the master."""
    return tuple(reversed(lb_names))


def rolling_gates(
    lb_names: Sequence[str],
    web_names: Sequence[str],
    max_unavailable: float = DEFAULT_MAX_UNAVAILABLE,
) -> dict[str, tuple[str, ...]]:
    """For every server, the servers whose readiness its turn waits for.

    Two independent chains: the LBs one by one (`lb_order`), the web servers wave by
    wave (`web_waves`). A server's turn (replace, resize, reconfigure) starts only when
    every server of the previous turn is ready again, so at most one LB and one wave of
    web servers are out of service at any moment.
    """
    gates: dict[str, tuple[str, ...]] = {}
    previous: tuple[str, ...] = ()
    for lb in lb_order(lb_names):
        gates[lb] = previous
        previous = (lb,)
    previous = ()
    for wave in web_waves(web_names, max_unavailable):
        for web in wave:
            gates[web] = previous
        previous = wave
    return gates
