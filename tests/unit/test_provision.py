"""Remote steps under Pulumi mocks: order, dependencies, secrecy and triggers per host."""

from __future__ import annotations

import itertools
from typing import Any

from components.cluster import HaWebCluster
from components.render import DAEMONS
from tests.conftest import (
    SECRET_MARK,
    SECRET_SIG,
    RecordingMonitor,
    make_stack,
    run,
)

COMMAND = "command:remote:Command"
ROLE_STEPS = {
    "lb": ["keys", "base", *[d.name for d in DAEMONS if d.role == "lb"], "serve"],
    # without siteDir the site step switches to the placeholder release
    "web": ["keys", "base", *[d.name for d in DAEMONS if d.role == "web"], "site", "serve"],
}
#: Readiness steps after `serve`: an LB checks itself, a web server is checked on each LB.
READY = {"lb": ["ready"], "web": ["ready-lb1", "ready-lb2"]}


def build(monitor: RecordingMonitor, **overrides: Any) -> dict[str, Any]:
    run(lambda: HaWebCluster("t", make_stack(stats_password="statsPw-1", **overrides)))
    return {r.name: r for r in monitor.of_type(COMMAND)}


def test_each_host_gets_its_steps_in_order(monitor: RecordingMonitor) -> None:
    steps = build(monitor, web_count=3)
    hosts = {"lb1": "lb", "lb2": "lb", "web1": "web", "web2": "web", "web3": "web"}
    expected = {
        f"t-{h}-{s}" for h, role in hosts.items() for s in [*ROLE_STEPS[role], *READY[role]]
    }
    assert set(steps) == expected
    for host, role in hosts.items():
        names = [f"t-{host}-{s}" for s in ROLE_STEPS[role]]
        for before, after in itertools.pairwise(names):
            assert steps[before].urn in steps[after].dependencies, f"{after} must wait for {before}"
        for ready in READY[role]:
            assert steps[names[-1]].urn in steps[f"t-{host}-{ready}"].dependencies
        server = monitor.named(f"t-{host}")
        assert server.urn in steps[names[0]].dependencies, f"{names[0]} must wait for its server"


def test_the_load_balancers_never_reload_at_the_same_moment(monitor: RecordingMonitor) -> None:
    steps = build(monitor)
    for daemon in ROLE_STEPS["lb"][2:-1]:
        assert steps[f"t-lb1-{daemon}"].urn in steps[f"t-lb2-{daemon}"].dependencies
    # web servers do not wait for each other: their steps run in parallel
    assert steps["t-web1-apache"].urn not in steps["t-web2-apache"].dependencies


def test_steps_connect_as_root_to_their_own_server(monitor: RecordingMonitor) -> None:
    steps = build(monitor)
    addresses = {
        r.name: r.state["ipv4Address"] for r in monitor.of_type("hcloud:index/server:Server")
    }
    for name, step in steps.items():
        host, _, kind = name.removeprefix("t-").partition("-")
        if kind.startswith("ready-"):  # a web server's readiness is checked on an LB
            host = kind.removeprefix("ready-")
        wire = step.wire["connection"]
        assert wire[SECRET_SIG] == SECRET_MARK, "the connection carries the private key: secret"
        connection = wire["value"]
        assert connection["user"] == "root"
        assert connection["host"] == addresses[f"t-{host}"], f"{name} must reach its own server"


def test_files_travel_as_secret_stdin_and_commands_stay_readable(
    monitor: RecordingMonitor,
) -> None:
    steps = build(monitor)
    daemons = {d.name for d in DAEMONS}
    for name, step in steps.items():
        kind = name.removeprefix("t-").partition("-")[2]
        if kind == "keys":  # public keys only
            assert step.inputs["stdin"].startswith("ssh-ed25519 "), name
            continue
        if kind not in daemons:
            assert "stdin" not in step.inputs, name
            continue
        stdin = step.wire["stdin"]
        assert isinstance(stdin, dict) and stdin.get(SECRET_SIG) == SECRET_MARK, name
        # the command a reviewer sees in `pulumi preview` is plain text
        assert isinstance(step.wire["create"], str), name
        assert "base64 -d | tar" in step.wire["create"]


def triggers(monitor: RecordingMonitor, **overrides: Any) -> dict[str, Any]:
    monitor.registrations.clear()
    return {name: step.inputs["triggers"] for name, step in build(monitor, **overrides).items()}


def test_triggers_change_when_and_only_when_their_content_changes(
    monitor: RecordingMonitor,
) -> None:
    base = triggers(monitor)
    assert triggers(monitor) == base
    changed = {n for n, t in triggers(monitor, cookie_mode="insert").items() if base[n] != t}
    # ... and the readiness of every host that changed runs again
    assert changed == {
        *("t-lb1-haproxy", "t-lb2-haproxy", "t-web1-apache", "t-web2-apache"),
        *("t-lb1-ready", "t-lb2-ready"),
        *(f"t-{w}-ready-{lb}" for w in ("web1", "web2") for lb in ("lb1", "lb2")),
    }
    changed = {n for n, t in triggers(monitor, vrrp_router_id=77).items() if base[n] != t}
    assert changed == {"t-lb1-keepalived", "t-lb2-keepalived", "t-lb1-ready", "t-lb2-ready"}
