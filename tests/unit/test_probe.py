"""lab.probe tells a refused, a timed-out and an accepted connection apart, and raises
when it cannot probe at all (so a negative test never mistakes that for unreachable)."""

import socket

import pytest

from lab.probe import tcp_probe


def test_a_listening_port_connects_and_a_closed_one_is_refused() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tcp_probe("127.0.0.1", port).outcome == "connected"
    closed = tcp_probe("127.0.0.1", port)
    assert closed.outcome == "refused"
    assert closed.reached, "a RST proves the host answered"


def test_a_probe_that_cannot_run_raises_instead_of_reporting_unreachable() -> None:
    with pytest.raises(OSError):
        tcp_probe("not-an-address", 80)
    with pytest.raises(OverflowError):
        tcp_probe("127.0.0.1", 70000)
