"""Lab tier fixtures: a namespace topology per test, the fake Hetzner API, tiny listeners.

Every test marked ``lab`` is skipped - loudly, with the reason - when the lab
cannot run here (not root, ``ip``/``haproxy``/``keepalived``/``apache2``/``curl``
missing).  The reason is also printed in the session header.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.cluster import LabCluster
from lab.fake_hcloud import FakeApi, launch
from lab.netns import Host, requirements_missing
from lab.topology import FLOATING_IP, LabNetwork

LAB_REASON = requirements_missing()
LISTEN_PORT = 8080


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab: needs root and network namespaces; runs real daemons (tests/lab)"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"lab tier: {'SKIPPED - ' + LAB_REASON if LAB_REASON else 'can run (root, tools found)'}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not LAB_REASON:
        return
    skip = pytest.mark.skip(reason=f"LAB TIER NOT RUN: {LAB_REASON}")
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(skip)


@pytest.fixture
def lab_net() -> Iterator[LabNetwork]:
    """A fresh topology (2 web servers) for one test, torn down whatever happens."""
    if LAB_REASON:
        pytest.skip(f"LAB TIER NOT RUN: {LAB_REASON}")
    with LabNetwork(web_count=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    """The whole cluster (2 web servers) on a fresh topology, one per test module.

    A module that needs other settings (test_https.py) defines its own `cluster`."""
    if LAB_REASON:
        pytest.skip(f"LAB TIER NOT RUN: {LAB_REASON}")
    with LabNetwork(web_count=2) as lab, LabCluster(lab) as c:
        yield c


@pytest.fixture(scope="module")
def api_lab() -> Iterator[tuple[LabNetwork, FakeApi]]:
    """One topology plus a running fake API, shared by a module's tests (reset per test)."""
    if LAB_REASON:
        pytest.skip(f"LAB TIER NOT RUN: {LAB_REASON}")
    with LabNetwork(web_count=1) as lab:
        yield lab, launch(lab)


class NamedListener:
    """A tiny HTTP/1.0 responder bound inside a host's namespace, answering its host name.

    The listening socket is created in the host's namespace (``Host.call``); the
    accept loop runs in a thread of the test process, bounded by ``max_seconds``.
    """

    def __init__(self, host: Host, port: int = LISTEN_PORT, max_seconds: float = 120.0) -> None:
        self.host = host
        self.port = port
        self.max_seconds = max_seconds
        self.sock: socket.socket = host.call(self._listen, port)
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"listener-{host.name}")
        self._thread.daemon = True
        self._thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(16)
        sock.settimeout(0.1)
        return sock

    def _serve(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    conn.recv(4096)
                    body = self.host.name.encode()
                    conn.sendall(
                        b"HTTP/1.0 200 OK\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )
                    self.hits += 1
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()


@pytest.fixture
def listeners() -> Iterator[Callable[[Host], NamedListener]]:
    """Factory: ``listeners(host)`` starts a :class:`NamedListener`; all closed after the test."""
    started: list[NamedListener] = []

    def start(host: Host, **kw: Any) -> NamedListener:
        listener = NamedListener(host, **kw)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.close()


def _curl_floating_ip(lab: LabNetwork, port: int = LISTEN_PORT, timeout: float = 2.0) -> str:
    proc = lab.client.run(
        ["curl", "-s", "--max-time", str(timeout), f"http://{FLOATING_IP}:{port}/"],
        check=False,
        timeout=timeout + 3,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


@pytest.fixture
def curl_fip() -> Callable[..., str]:
    """``curl_fip(lab)``: the body the client gets from the floating IP ("" on failure)."""
    return _curl_floating_ip
