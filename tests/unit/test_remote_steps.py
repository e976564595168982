"""The program's remote steps as plain values (lab.program), and how lab.cloud.apply runs
them: what the local cloud tier relies on, checked without booting anything."""

from __future__ import annotations

import base64
import gzip
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from components.site import STUB_DIR
from lab.cloud.apply import apply, changed, replay_copy
from lab.cloud.common import CloudError
from lab.program import ProviderFacts, RemoteStep, program_steps
from tests.conftest import valid_config

HOSTS = ("lb1", "lb2", "web1", "web2")
FACTS = ProviderFacts(
    servers={f"hcloud-ha-web-{h}": (500 + i, f"198.18.9.{10 + i}") for i, h in enumerate(HOSTS)},
    floating_ip=(4711, "198.19.1.1"),
)


def steps(**overrides: Any) -> dict[str, RemoteStep]:
    config, secret_keys = valid_config(**overrides)
    return program_steps(config, secret_keys, FACTS)


def test_steps_connect_to_the_servers_the_provider_reported() -> None:
    plan = steps()
    assert {s.host for s in plan.values()} == {a for _, a in FACTS.servers.values()}
    for name, step in plan.items():
        host, _, kind = name.removeprefix("hcloud-ha-web-").partition("-")
        if kind.startswith("ready-"):  # a web server's readiness is checked on an LB
            host = kind.removeprefix("ready-")
        assert step.host == FACTS.servers[f"hcloud-ha-web-{host}"][1]
        assert step.user == "root"


def test_steps_carry_the_provider_facts_and_their_dependencies() -> None:
    plan = steps()
    keepalived = plan["hcloud-ha-web-lb2-keepalived"]
    assert keepalived.after == ("hcloud-ha-web-lb1-keepalived", "hcloud-ha-web-lb2-watcher")
    assert plan["hcloud-ha-web-web1-base"].after == ("hcloud-ha-web-web1-keys",)
    assert plan["hcloud-ha-web-web1-keys"].after == ()
    # the failover script is rendered with the ids the provider gave
    failover = plan["hcloud-ha-web-lb2-failover"]
    files = gzip.decompress(base64.b64decode(failover.stdin)).decode("latin-1")
    assert "4711" in files and str(FACTS.servers["hcloud-ha-web-lb2"][0]) in files


def test_same_config_same_inputs_and_a_change_touches_only_its_steps() -> None:
    before = steps()
    assert changed(steps(), before) == set()
    assert changed(steps(vrrpRouterId="77"), before) == {
        "hcloud-ha-web-lb1-keepalived",
        "hcloud-ha-web-lb2-keepalived",
        # each changed host's readiness is checked again
        "hcloud-ha-web-lb1-ready",
        "hcloud-ha-web-lb2-ready",
    }


# --- the scheduler, with hosts that only record -------------------------------------------


@dataclass
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


@dataclass
class RecordingHost:
    """Stands in for a CloudHost: runs nothing, records when each command ran."""

    fail: set[str] = field(default_factory=set)
    log: list[tuple[str, str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ssh(self, cmd: str, stdin: str = "", timeout: float = 0, check: bool = True) -> Result:
        t0 = time.monotonic()
        time.sleep(0.05)
        with self.lock:
            self.log.append((cmd, stdin, t0, time.monotonic()))
        return Result(1 if cmd in self.fail else 0, stderr="boom" if cmd in self.fail else "")


def step(name: str, host: str = "10.0.0.1", after: tuple[str, ...] = ()) -> RemoteStep:
    return RemoteStep(name, host, "root", f"run {name}", f"stdin of {name}", (name,), after)


def graph() -> dict[str, RemoteStep]:
    return {
        "a": step("a"),
        "b": step("b", "10.0.0.2"),
        "c": step("c", after=("a",)),
        "d": step("d", "10.0.0.2", after=("b", "c")),
    }


def test_apply_keeps_dependency_order_and_runs_independent_steps_together() -> None:
    hosts = {"10.0.0.1": RecordingHost(), "10.0.0.2": RecordingHost()}
    result = apply(graph(), hosts)  # type: ignore[arg-type]
    assert result.ok and result.named("ran") == ["a", "b", "c", "d"]
    runs = result.runs
    assert runs["a"].finished <= runs["c"].started
    assert max(runs["b"].finished, runs["c"].finished) <= runs["d"].started
    assert runs["a"].started < runs["b"].finished and runs["b"].started < runs["a"].finished
    assert [(c, s) for c, s, *_ in hosts["10.0.0.2"].log] == [
        ("run b", "stdin of b"),
        ("run d", "stdin of d"),
    ]


def test_apply_runs_only_what_changed_and_stops_after_a_failure() -> None:
    hosts = {"10.0.0.1": RecordingHost(fail={"run c"}), "10.0.0.2": RecordingHost()}
    before = graph()
    now = dict(before, c=replace(before["c"], stdin="new"))
    result = apply(now, hosts, before)  # type: ignore[arg-type]
    assert [r.status for r in result.runs.values()] == [
        "unchanged",
        "unchanged",
        "failed",
        "unchanged",
    ]
    assert result.runs["c"].stderr == "boom" and not result.ok
    hosts = {"10.0.0.1": RecordingHost(fail={"run a"}), "10.0.0.2": RecordingHost()}
    result = apply(graph(), hosts)  # type: ignore[arg-type]
    assert result.runs["a"].status == "failed"
    assert result.runs["c"].status == "not run" and result.runs["d"].status == "not run"


def test_apply_refuses_steps_it_cannot_place() -> None:
    with pytest.raises(CloudError, match="no lab host"):
        apply({"a": step("a", "10.9.9.9")}, {"10.0.0.1": RecordingHost()})  # type: ignore[dict-item]
    with pytest.raises(CloudError, match="logs in as"):
        apply({"a": replace(step("a"), user="admin")}, {"10.0.0.1": RecordingHost()})  # type: ignore[dict-item]


def test_site_copies_are_steps_the_lab_replays(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "index.html").write_text("A\n")
    plan = steps(siteDir=str(site_dir))
    copy = plan["hcloud-ha-web-web1-site-copy"]
    assert copy.is_copy and copy.source == str(site_dir) and copy.create == ""
    assert copy.remote_path.startswith("/var/www/hcloud-ha-web/.incoming/")
    assert copy.after == ("hcloud-ha-web-web1-site-check",)
    switch = plan["hcloud-ha-web-web1-site"]
    assert "hcloud-ha-web-web1-site-copy" in switch.after and not switch.is_copy
    # a one-file change: the engine would run exactly the site steps again
    (site_dir / "index.html").write_text("B\n")
    assert changed(steps(siteDir=str(site_dir)), plan) == {
        f"hcloud-ha-web-{h}-{s}"
        for h in ("web1", "web2")
        for s in ("site-check", "site-copy", "site")
    }


def test_the_check_answer_decides_what_the_copy_ships(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "index.html").write_text("A\n")
    config, secret_keys = valid_config(siteDir=str(site_dir))
    asked: list[str] = []

    def answer(name: str, inputs: Any) -> str | None:
        asked.append(name)
        return "release-present" if name.endswith("web2-site-check") else None

    plan = program_steps(config, secret_keys, FACTS, command_stdout=answer)
    assert plan["hcloud-ha-web-web1-site-copy"].source == str(site_dir)
    assert Path(plan["hcloud-ha-web-web2-site-copy"].source) == STUB_DIR
    assert "hcloud-ha-web-web2-site-check" in asked


class LocalHost:
    """A host whose SSH session is a local shell: replay_copy's stream, run here."""

    def ssh_argv(self, command: str) -> list[str]:
        return ["sh", "-c", command]


def test_a_copy_is_replayed_as_copy_to_remote_does_it(tmp_path: Path) -> None:
    source = tmp_path / "site"
    (source / "css").mkdir(parents=True)
    (source / "index.html").write_text("A\n")
    (source / "css" / "a.css").write_text("b {}\n")
    target = tmp_path / "host" / "incoming" / "abc"
    copy = RemoteStep("c", "10.0.0.1", "root", "", "", ("abc",), (), str(source), str(target))
    r = replay_copy(copy, LocalHost(), 30)  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    # a new remote path holds the directory's content
    assert (target / "index.html").read_text() == "A\n"
    assert (target / "css" / "a.css").read_text() == "b {}\n"
    # an existing directory gets the source directory inside it
    r = replay_copy(copy, LocalHost(), 30)  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    assert (target / "site" / "index.html").read_text() == "A\n"
    missing = replace(copy, source=str(tmp_path / "nothing"))
    assert replay_copy(missing, LocalHost(), 30).returncode != 0  # type: ignore[arg-type]
