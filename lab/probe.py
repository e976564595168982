"""Reachability probes that cannot be skipped by a missing tool.

A TCP connect from Python (run inside a namespace with ``Host.call``) tells four outcomes
apart by what the kernel answered: ``connected``, ``refused`` (a RST: the address is
reachable, nothing listens), ``unreachable`` (no route, or no neighbour answered ARP) and
``timeout`` (nothing came back). A negative test asserts one of the last two, so a probe
that never ran (a missing ``ping``, a bad argument) cannot pass as "unreachable": it
raises instead of returning an outcome.
"""

from __future__ import annotations

import errno
import socket
import time
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["connected", "refused", "unreachable", "timeout"]

#: A port nothing in the lab listens on: a reachable host answers it with a RST.
CLOSED_PORT = 9
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN}


@dataclass(frozen=True)
class Probe:
    address: str
    port: int
    outcome: Outcome
    seconds: float
    detail: str

    @property
    def reached(self) -> bool:
        """The host answered (with a SYN-ACK or a RST)."""
        return self.outcome in ("connected", "refused")

    def __str__(self) -> str:
        return (
            f"tcp {self.address}:{self.port} -> {self.outcome} ({self.detail}, {self.seconds:.2f}s)"
        )


def tcp_probe(address: str, port: int = CLOSED_PORT, wait: float = 1.0) -> Probe:
    """Try one TCP connection to ``address:port`` for at most ``wait`` seconds.

    Any error other than the four outcomes (e.g. an invalid address) raises: the probe
    did not run, and the caller must not read that as "unreachable".
    """
    started = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        try:
            sock.connect((address, port))
            outcome: Outcome = "connected"
            detail = "SYN-ACK"
        except ConnectionRefusedError:
            outcome, detail = "refused", "RST"
        except TimeoutError:
            outcome, detail = "timeout", f"no answer within {wait}s"
        except OSError as err:
            if err.errno not in _UNREACHABLE:
                raise
            outcome, detail = "unreachable", errno.errorcode.get(err.errno or 0, str(err))
    return Probe(address, port, outcome, time.monotonic() - started, detail)
