"""lab.cloud.apply.rollout: a `pulumi up` on a deployed cluster replayed in the engine's
order from what the program registers (no hand-kept list), checked with a recording
cloud: who is out of service when, and what runs before what."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from components import day2
from lab.cloud.apply import Event, dependent_replacements, diff, rollout
from lab.cloud.common import CloudError
from lab.program import PlannedResource, ProviderFacts, program_plan
from tests.conftest import make_settings, valid_config

P = "hcloud-ha-web-"


def facts(webs: int, deployed: bool = True) -> ProviderFacts:
    hosts = ["lb1", "lb2", *(f"web{i}" for i in range(1, webs + 1))]
    return ProviderFacts(
        servers={f"{P}{h}": (500 + i, f"198.18.9.{10 + i}") for i, h in enumerate(hosts)},
        floating_ip=(4711, "198.19.1.1"),
        deployed=deployed,
    )


def plan(webs: int, deployed: bool = True, **overrides: Any) -> dict[str, PlannedResource]:
    config, secret_keys = valid_config(webCount=str(webs), **overrides)
    return program_plan(config, secret_keys, facts(max(webs, 4), deployed))[1]


HOST_OF = {a: h.removeprefix(P) for h, (_, a) in facts(4).servers.items()}


@dataclass
class FakeCloud:
    """Records every provider action and remote script; scripts take a moment."""

    fail: str = ""
    log: list[tuple[float, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _note(self, what: str, host: str) -> None:
        with self.lock:
            self.log.append((time.monotonic(), what, host))

    def run(self, address: str, script: str, stdin: str) -> tuple[int, str, str]:
        host = HOST_OF[address]
        kind = "script"
        if script == day2.drain_script("lb" if host.startswith("lb") else "web", _settings()):
            kind = "drain"
        elif script == day2.lb_ready_script():
            kind = "ready"
        else:  # a web server's readiness, checked on an LB: noted for the web server
            for web in _webs():
                if script == day2.web_ready_script(web):
                    kind, host = "ready", web
        self._note(kind, host)
        time.sleep(0.01)
        return (1, "", "boom") if self.fail and self.fail in script else (0, "", "")

    def server_create(self, name: str, inputs: Any) -> None:
        self._note("server_create", name.removeprefix(P))

    def server_delete(self, name: str) -> None:
        self._note("server_delete", name.removeprefix(P))

    def server_update(self, name: str, old: Any, new: Any) -> None:
        self._note("server_update", name.removeprefix(P))


def _settings() -> Any:
    return make_settings()


def _webs() -> list[str]:
    return [f"web{i}" for i in range(1, 5)]


def hook_runner(cloud: FakeCloud) -> None:
    day2.REMOTE_RUNNER = lambda address, script: cloud._note("hook_drain", HOST_OF[address])


@pytest.fixture(autouse=True)
def _no_runner() -> Any:
    yield
    day2.REMOTE_RUNNER = None


def out_intervals(log: list[tuple[float, str, str]]) -> dict[str, list[tuple[float, float]]]:
    """Per host: from its drain (or deletion) to the end of its last readiness check."""
    spans: dict[str, list[tuple[float, float]]] = {}
    start: dict[str, float] = {}
    for t, what, host in log:
        if what in ("drain", "hook_drain", "server_delete") and host not in start:
            start[host] = t
        elif what == "ready" and host in start:
            spans.setdefault(host, []).append((start.pop(host), t))
    for host, t0 in start.items():
        spans.setdefault(host, []).append((t0, float("inf")))
    return spans


def most_out_at_once(spans: dict[str, list[tuple[float, float]]], prefix: str) -> int:
    edges = sorted(
        (t, d)
        for h, ss in spans.items()
        if h.startswith(prefix)
        for a, b in ss
        for t, d in ((a, 1), (b, -1))
    )
    now = peak = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def first(log: list[tuple[float, str, str]], what: str, host: str) -> float:
    return next(t for t, w, h in log if w == what and h == host)


def test_diff_follows_the_providers() -> None:
    old, new = plan(2), plan(2, image="debian-12")
    assert diff(old[f"{P}web1"], new[f"{P}web1"]) == "replace"
    assert diff(old[f"{P}web1"], plan(2, serverType="cx33")[f"{P}web1"]) == "update"
    assert diff(old[f"{P}web1-apache"], new[f"{P}web1-apache"]) == "same"
    # the keys of a server are ignored (rotated by the keys step)
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAg k"
    rotated = plan(2, sshPublicKey=key)
    assert diff(old[f"{P}web1"], rotated[f"{P}web1"]) == "same"
    assert diff(old[f"{P}web1-keys"], rotated[f"{P}web1-keys"]) == "replace"  # keys in triggers


def test_replacing_a_server_deletes_its_own_steps_first_and_no_other() -> None:
    old = plan(2)
    cascade = dependent_replacements(f"{P}web1", old)
    assert f"{P}web1-serve" in cascade and f"{P}web1-apache" in cascade
    assert all(n.startswith(f"{P}web1-") for n in cascade)
    # lb1: its own steps and the web servers' readiness checks that run on it; the
    # floating IP assignment ignores server_id, so it is not replaced
    for name in dependent_replacements(f"{P}lb1", old):
        assert name.startswith(f"{P}lb1-") or name.endswith("-ready-lb1"), name


def test_a_new_image_replaces_one_server_at_a_time_each_handing_over_first() -> None:
    cloud = FakeCloud()
    result, events = rollout(plan(4), plan(4, image="debian-12"), cloud)
    assert result.ok, result.failure()
    log = cloud.log
    for host in ("lb1", "lb2", "web1", "web2", "web3", "web4"):
        assert first(log, "drain", host) < first(log, "server_delete", host)
        assert first(log, "server_delete", host) < first(log, "server_create", host)
    # the backup LB first; the master goes only when lb2 is ready again
    lb2_ready = max(t for t, w, h in log if w == "ready" and h == "lb2")
    assert lb2_ready < first(log, "drain", "lb1")
    spans = out_intervals(log)
    assert most_out_at_once(spans, "lb") == 1
    assert most_out_at_once(spans, "web") == 2  # half of 4
    assert first(log, "server_create", "web2") < first(log, "drain", "web3")
    assert any(e.what == "replace" and e.name == f"{P}web3" for e in events)


def test_a_resize_drains_through_the_hook_then_powers_off_one_turn_at_a_time() -> None:
    cloud = FakeCloud()
    hook_runner(cloud)
    result, events = rollout(plan(2), plan(2, serverType="cx33"), cloud, hooks=day2.HOOKS)
    assert result.ok, result.failure()
    log = cloud.log
    for host in ("lb1", "lb2", "web1", "web2"):
        assert first(log, "hook_drain", host) < first(log, "server_update", host)
    assert not [w for _, w, _ in log if w in ("server_delete", "server_create")]
    assert first(log, "server_update", "lb2") < first(log, "hook_drain", "lb1")
    assert max(t for t, w, h in log if w == "ready" and h == "lb2") < first(
        log, "hook_drain", "lb1"
    )
    assert [e.name for e in events if e.what == "hook"].count(f"{P}web1-drain") == 1


def test_a_removed_web_server_is_drained_after_everything_else() -> None:
    cloud = FakeCloud()
    result, _ = rollout(plan(3), plan(2), cloud)
    assert result.ok, result.failure()
    log = cloud.log
    assert first(log, "drain", "web3") < first(log, "server_delete", "web3")
    others = [t for t, w, h in log if h != "web3" and w != "drain"]
    assert max(others) < first(log, "drain", "web3")


def test_settings_that_cannot_roll_stop_the_update_before_anything_runs() -> None:
    cloud = FakeCloud()
    with pytest.raises(CloudError, match="new stack"):
        rollout(plan(2), plan(2, location="hel1"), cloud)
    assert cloud.log == []
    result, _ = rollout(plan(2), plan(2, location="hel1", allowDisruptiveChanges="true"), cloud)
    assert result.ok
    created = [h for _, w, h in cloud.log if w == "server_create"]
    assert sorted(created) == ["lb1", "lb2", "web1", "web2"]
    assert created.index("lb2") < created.index("lb1")
    assert created.index("web1") < created.index("web2")


def test_a_failed_step_stops_the_turns_after_it() -> None:
    cloud = FakeCloud(fail="haproxy")
    result, _ = rollout(plan(2), plan(2, cookieMode="insert"), cloud)
    assert not result.ok
    failed = result.named("failed")
    assert failed == [f"{P}lb2-haproxy"]
    assert result.runs[f"{P}lb1-haproxy"].status == "not run"


def test_events_are_in_time_order() -> None:
    _, events = rollout(plan(2), plan(2, image="debian-12"), FakeCloud())
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert isinstance(events[0], Event)
