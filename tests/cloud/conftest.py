"""Local cloud tier fixtures: a tiny namespace network for booted Debian hosts, benchmarks.

Every test marked ``cloud`` is skipped - loudly, with the reason - when the tier
cannot run here: not root, ``debootstrap`` / ``systemd-nspawn`` / ``ssh`` / ...
missing, or the Debian mirror this machine's apt uses is unreachable.  The
reason is also printed in the session header.

:class:`TestNet` is the small stand-in for ``lab.topology`` used by these
tests: one switch namespace ``<prefix>-sw`` holding bridge ``br0``, and per
host a namespace ``<prefix>-<name>`` with ``eth0`` (a veth into the switch)
addressed from 198.18.0.0/24.  Nothing is created in the root namespace.

Benchmarks are collected with the ``bench`` fixture and printed at the end of
the session as JSON lines, as ``make bench`` prints them
(``{"metric": "cloud.<what>", "value": ..., "unit": ..., ...}``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.cloud.common import new_prefix, requirements_missing
from lab.cloud.rootfs import apt_mirror, mirror_reachable

NETNS_DIR = Path("/run/netns")
SUBNET = "198.18.0"  # /24 inside the test's own namespaces only

_REASON: list[str | None] = []  # computed once, lazily (the mirror check costs a request)
_BENCH: list[dict[str, Any]] = []


def cloud_reason() -> str | None:
    """Why the cloud tier cannot run here, or None."""
    if not _REASON:
        reason = requirements_missing()
        if reason is None:
            try:
                mirror = apt_mirror()
            except RuntimeError as exc:
                reason = str(exc)
            else:
                reason = mirror_reachable(mirror, "trixie")
                if reason:
                    reason = f"Debian mirror unreachable: {reason}"
        _REASON.append(reason)
    return _REASON[0]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cloud: needs root, systemd-nspawn (systemd-container) and debootstrap; boots local "
        "Debian 12/13 systemd hosts (minutes)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cloud_items = [i for i in items if i.get_closest_marker("cloud") is not None]
    if not cloud_items:
        return
    reason = cloud_reason()
    if reason:
        skip = pytest.mark.skip(reason=f"CLOUD TIER NOT RUN: {reason}")
        for item in cloud_items:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str | None:
    if not _REASON:
        return None  # no cloud test collected yet: do not probe the mirror for nothing
    reason = _REASON[0]
    return f"cloud tier: {'SKIPPED - ' + reason if reason else 'can run (root, tools, mirror)'}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _BENCH:
        terminalreporter.section("cloud benchmarks (JSON lines)")
        for rec in _BENCH:
            terminalreporter.write_line(json.dumps(rec, sort_keys=False))
    if _REASON and _REASON[0]:
        terminalreporter.section("cloud tier")
        terminalreporter.write_line(f"CLOUD TIER NOT RUN: {_REASON[0]}", yellow=True, bold=True)


class Bench:
    def record(self, name: str, value: float | int, unit: str, **extra: Any) -> None:
        rec: dict[str, Any] = {
            "metric": f"cloud.{name}",
            "value": round(value, 3) if isinstance(value, float) else value,
            "unit": unit,
        }
        rec.update(extra)
        _BENCH.append(rec)
        print(json.dumps(rec))


@pytest.fixture(scope="session")
def bench() -> Bench:
    return Bench()


# --------------------------------------------------------------------------- test network


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15, check=check)


class TestNet:
    """A switch namespace with a bridge and one namespace per host (veth ``eth0``).

    ``close`` deletes every namespace it created (taking bridge and veths with
    them) after killing - by PID - whatever still runs in them.
    """

    __test__ = False  # not a test class for pytest

    def __init__(self, prefix: str, hosts: list[str]) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.namespaces: list[str] = []
        self.addresses: dict[str, str] = {}
        self.netns: dict[str, str] = {}
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            # Bridged frames of this switch never traverse an iptables FORWARD chain: the
            # br_netfilter hooks are per namespace and we switch them off here (only here).
            for key in (
                "bridge-nf-call-iptables",
                "bridge-nf-call-ip6tables",
                "bridge-nf-call-arptables",
            ):
                subprocess.run(
                    ["ip", "netns", "exec", self.switch, "sysctl", "-qw", f"net.bridge.{key}=0"],
                    capture_output=True,
                    timeout=15,
                    check=False,
                )
            for n, name in enumerate(hosts, start=10):
                ns = f"{prefix}-{name}"
                self._add_ns(ns)
                _ip(
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    f"v-{name}"[:15],
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                _ip("-n", self.switch, "link", "set", f"v-{name}"[:15], "master", "br0", "up")
                addr = f"{SUBNET}.{n}"
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses[name] = addr
                self.netns[name] = ns
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)

    def close(self) -> list[str]:
        problems = []
        for ns in reversed(self.namespaces):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                problems.append(f"process {pid} still in {ns}; killing it")
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            deadline = time.monotonic() + 5
            for _ in range(50):
                if (
                    not _ip("netns", "pids", ns, check=False).stdout.split()
                    or time.monotonic() > deadline
                ):
                    break
                time.sleep(0.1)
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()
        return problems

    def leftovers(self) -> list[str]:
        left = (
            [f"netns {p.name}" for p in NETNS_DIR.glob(f"{self.prefix}-*")]
            if NETNS_DIR.is_dir()
            else []
        )
        links = _ip("-o", "link", "show", check=False).stdout
        left += [
            f"root link {ln.split(':')[1].strip()}"
            for ln in links.splitlines()
            if self.prefix in ln
        ]
        return left


@pytest.fixture(scope="module")
def cloud_prefix() -> str:
    reason = cloud_reason()
    if reason:
        pytest.skip(f"CLOUD TIER NOT RUN: {reason}")
    return new_prefix()


@pytest.fixture(scope="module")
def make_test_net(cloud_prefix: str) -> Iterator[Callable[[list[str]], TestNet]]:
    """``make_test_net(["a", "b"])`` -> a :class:`TestNet` with the module's prefix;
    every network made is closed at module teardown (whatever happened)."""
    nets: list[TestNet] = []

    def make(hosts: list[str]) -> TestNet:
        net = TestNet(cloud_prefix, hosts)
        nets.append(net)
        return net

    yield make
    for net in nets:
        net.close()
