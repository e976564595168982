"""Lab tier: the rendered failover script against the fake Hetzner API, in lb1's namespace.

No keepalived here: the test plays keepalived, marking mastership as it does (the floating
IP on lo) and running `claim` / `stand-down` / `ensure` as its notify scripts would. The
fake API's fault queue supplies the failures (423, 429 with RateLimit-Reset, redirect,
non-JSON, dropped connections, actions that fail or take a while).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components.render import (
    EVENT_HOOK,
    FAILOVER_SCRIPT,
    FAILOVER_STATE_FILE,
    TOKEN_FILE,
    ClusterFacts,
    Layout,
    RenderSecrets,
    render_host,
)
from lab import topology as topo
from lab.cluster import assign_calls, lab_settings, wait_for
from lab.fake_hcloud import FakeApi
from lab.topology import LabNetwork

pytestmark = pytest.mark.lab

WRONG_TOKEN = "W" * 64


class Failover:
    """The rendered script of lb1 under its own root, run inside lb1's namespace."""

    def __init__(self, lab: LabNetwork, api: FakeApi, root: Path) -> None:
        self.lab, self.api, self.root = lab, api, root
        self.host = lab["lb1"]
        self.log = root / "var/log/hcloud-floating-ip.log"
        layout = Layout(root=str(root), failover_log_file=str(self.log))
        settings = lab_settings(lab.web_count, api.url)
        facts = ClusterFacts(
            topo.FLOATING_IP,
            topo.FLOATING_IP_ID,
            {**topo.LB_SERVER_IDS, **{topo.web_name(1): topo.web_server_id(1)}},
        )
        secrets = RenderSecrets("stats pw", "lab-vrrp", api.token)
        for f in render_host(settings, facts, secrets, "lb1", layout):
            if f.daemon == "failover":
                path = Path(f.path)
                path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                path.write_text(f.content)
                path.chmod(int(f.mode, 8))
        for d in ("run", "var/log"):
            (root / d).mkdir(mode=0o755, parents=True, exist_ok=True)
        self.script = root / FAILOVER_SCRIPT.lstrip("/")
        self.token_file = root / TOKEN_FILE.lstrip("/")
        self.state_file = root / FAILOVER_STATE_FILE.lstrip("/")
        self.hook_out = root / "hook.out"

    def argv(self, action: str) -> list[str]:
        return [sys.executable, str(self.script), action]

    def run(self, action: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.host.run(self.argv(action), check=False, timeout=timeout)

    def start(self, action: str) -> subprocess.Popen[Any]:
        return self.host.popen(self.argv(action), log=self.root / f"{action}.out")

    def master(self, on: bool) -> None:
        verb = "replace" if on else "del"
        self.host.ip("-4", "addr", verb, f"{topo.FLOATING_IP}/32", "dev", "lo", check=on)

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def logged(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def install_hook(self) -> None:
        hook = self.root / EVENT_HOOK.lstrip("/")
        hook.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        hook.write_text(f'#!/bin/sh\n{{ printf "%s " "$1"; cat; }} >> {self.hook_out}\n')
        hook.chmod(0o755)

    def hook_calls(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.hook_out.exists():
            return []
        calls = []
        for line in self.hook_out.read_text().splitlines():
            kind, _, payload = line.partition(" ")
            calls.append((kind, json.loads(payload)))
        return calls


@pytest.fixture
def fo(api_lab: tuple[LabNetwork, FakeApi]) -> Iterator[Failover]:
    lab, api = api_lab
    api.client.reset()
    api.client.configure(action_seconds=0.0, rate_limit=3600)
    # the IP starts on lb2, so a claim by lb1 has something to do
    api.client.assign(topo.LB_SERVER_IDS["lb2"])
    wait_for(lambda: api.client.assigned_server() == topo.LB_SERVER_IDS["lb2"], 5, "IP on lb2")
    api.client.reset()
    root = Path("/run") / f"{lab.prefix}-fo-{time.monotonic_ns()}"
    root.mkdir(mode=0o755)
    f = Failover(lab, api, root)
    try:
        yield f
    finally:
        f.master(False)
        for proc in lab["lb1"].processes:
            lab["lb1"].kill(proc)
        api.client.clear_faults()
        shutil.rmtree(root, ignore_errors=True)


def assigns_since(api: FakeApi, ts: float) -> list[dict[str, Any]]:
    return [c for c in assign_calls(api.client.calls()) if c["ts"] >= ts]


def no_traceback(fo: Failover) -> None:
    assert "Traceback" not in fo.logged(), fo.logged()
    for out in fo.root.glob("*.out"):
        assert "Traceback" not in out.read_text(), out.read_text()


def test_stand_down_ends_every_claim(fo: Failover) -> None:
    """keepalived's notify_master and notify_master_rx_lower_pri both start a claim while
    the API answers 423; after stand-down no assign call may follow (the old script kept
    one claim assigning for a backup)."""
    fo.api.client.set_faults([{"kind": "locked", "on": "assign"}] * 200)
    fo.master(True)
    first, second = fo.start("claim"), fo.start("claim")
    wait_for(lambda: len(assigns_since(fo.api, 0)) >= 3, 10, "the claim retrying on 423")
    fo.master(False)
    assert fo.run("stand-down").returncode == 0
    stood_down = time.time()
    time.sleep(3.0)  # the old script's backoff would have assigned again within this
    late = assigns_since(fo.api, stood_down + 0.2)
    assert late == [], f"{len(late)} assign calls after stand-down"
    wait_for(lambda: first.poll() is not None and second.poll() is not None, 5, "claims end")
    assert fo.state()["last_claim"]["result"] == "stood_down"
    assert "a claim is already running" in fo.logged()
    no_traceback(fo)


def test_claim_without_mastership_never_assigns(fo: Failover) -> None:
    fo.master(False)
    result = fo.run("claim")
    assert result.returncode == 0
    assert assigns_since(fo.api, 0) == []
    assert fo.api.client.calls() == [], "not even a GET: mastership is checked first"
    assert fo.state()["last_claim"]["result"] == "stood_down"


def test_claim_follows_the_action_and_retries_a_failed_one(fo: Failover) -> None:
    fo.api.client.configure(action_seconds=1.0)
    fo.api.client.set_faults([{"kind": "action_error", "on": "assign"}])
    fo.master(True)
    result = fo.run("claim")
    assert result.returncode == 0, fo.logged()
    calls = fo.api.client.calls()
    assert len(assign_calls(calls)) == 2, calls
    followed = [c for c in calls if c["method"] == "GET" and "/actions/" in c["path"]]
    assert followed, "the action was never looked at"
    assert fo.api.client.assigned_server() == topo.LB_SERVER_IDS["lb1"]
    claim = fo.state()["last_claim"]
    assert claim["result"] == "assigned" and claim["attempts"] == 2, claim
    assert claim["ended"] >= claim["started"]
    assert "action_failed" in fo.logged()


def test_claim_waits_for_rate_limit_reset(fo: Failover) -> None:
    fo.api.client.set_faults([{"kind": "rate_limit", "on": "assign", "reset_in": 3}])
    fo.master(True)
    assert fo.run("claim").returncode == 0, fo.logged()
    assigns = assign_calls(fo.api.client.calls())
    assert len(assigns) == 2
    gap = assigns[1]["ts"] - assigns[0]["ts"]
    # the header is whole seconds: reset lies 2-3 s after the refused call
    assert gap >= 1.9, f"retried {gap:.2f}s after a 429 that said wait ~3 s"


def test_every_failure_is_one_clear_line_and_the_claim_goes_on(fo: Failover) -> None:
    fo.api.client.set_faults(
        [
            {"kind": "non_json", "on": "get"},
            {"kind": "drop", "on": "get"},
            {"kind": "rate_limit", "on": "assign", "reset": "soon"},
            {"kind": "server_error", "on": "assign"},
        ]
    )
    fo.master(True)
    assert fo.run("claim").returncode == 0, fo.logged()
    text = fo.logged()
    assert "not a JSON object" in text
    assert "RateLimit-Reset header that is not a number" in text
    assert "unreachable" in text and "server_error" in text
    assert fo.api.client.assigned_server() == topo.LB_SERVER_IDS["lb1"]
    no_traceback(fo)


def test_a_redirect_is_not_followed(fo: Failover) -> None:
    location = f"http://{topo.API_IP}:{topo.API_PORT}/v1/floating_ips/{topo.FLOATING_IP_ID}"
    fo.api.client.set_faults([{"kind": "redirect", "on": "get", "location": location}])
    fo.install_hook()
    fo.master(True)
    result = fo.run("claim")
    assert result.returncode == 3
    calls = fo.api.client.calls()
    # following it would have sent the token to `location` (here: the fake, which logs it)
    assert [(c["method"], c["status"]) for c in calls] == [("GET", 302)], calls
    assert "redirect" in fo.logged() and "not followed" in fo.logged()
    assert fo.state()["last_claim"]["result"] == "refused"
    wait_for(lambda: fo.hook_calls(), 5, "claim_failed event")
    assert [k for k, _ in fo.hook_calls()] == ["claim_failed"]
    no_traceback(fo)


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ("", "empty"),
        (f"{WRONG_TOKEN}\nsecond line\n", "two lines"),
        ("tok en with blanks and more", "blanks"),
        ("Bearer x\r\nX-Evil: 1", "header injection"),
    ],
)
def test_a_bad_token_file_is_a_clear_error(fo: Failover, content: str, what: str) -> None:
    fo.token_file.write_text(content)
    fo.master(True)
    result = fo.run("claim")
    assert result.returncode == 2, (what, fo.logged())
    assert "must hold one line" in fo.logged()
    if content:
        assert content.splitlines()[0] not in fo.logged() + result.stderr
    assert fo.api.client.calls() == []
    no_traceback(fo)


def test_an_invalid_url_is_logged_not_raised(fo: Failover) -> None:
    # stack config cannot produce this URL (config.py); the script must still cope
    text = fo.script.read_text()
    fo.script.write_text(text.replace(f'API = "{fo.api.url}"', 'API = "htp:/nowhere"', 1))
    fo.master(True)
    result = fo.run("claim")
    assert result.returncode == 3, fo.logged()
    assert "cannot send the request" in fo.logged(), fo.logged()
    no_traceback(fo)


def test_ensure_makes_a_refused_token_visible_every_time(fo: Failover) -> None:
    fo.install_hook()
    fo.token_file.write_text(WRONG_TOKEN + "\n")
    fo.master(False)  # a backup checks too: a revoked token must not wait for a failover
    for _ in range(3):
        assert fo.run("ensure").returncode == 0  # never changes the VRRP state
    errors = [ln for ln in fo.logged().splitlines() if "ERROR: the API refuses" in ln]
    assert len(errors) == 3, fo.logged()
    assert WRONG_TOKEN not in fo.logged()
    state = fo.state()
    assert state["api_auth"] == "refused" and state["api_auth_checked"] > time.time() - 30
    status = fo.run("status")
    assert status.returncode == 1 and '"api_auth": "refused"' in status.stdout
    wait_for(lambda: fo.hook_calls(), 5, "api_auth_refused event")
    time.sleep(0.3)
    kinds = [k for k, _ in fo.hook_calls()]
    assert kinds == ["api_auth_refused"], "one event on the change, not one per check"
    payload = fo.hook_calls()[0][1]
    assert payload["kind"] == "api_auth_refused" and payload["server_id"] == 101
    # the token is replaced: the next check clears the state
    fo.token_file.write_text(fo.api.token + "\n")
    assert fo.run("ensure").returncode == 0
    assert fo.state()["api_auth"] == "ok"
    assert fo.run("status").returncode == 0


def test_claim_with_a_refused_token_records_and_alerts(fo: Failover) -> None:
    fo.install_hook()
    fo.token_file.write_text(WRONG_TOKEN + "\n")
    fo.master(True)
    assert fo.run("claim").returncode == 3
    assert fo.state()["last_claim"]["result"] == "refused"
    assert fo.state()["api_auth"] == "refused"
    wait_for(lambda: len(fo.hook_calls()) >= 2, 5, "two events")
    assert sorted(k for k, _ in fo.hook_calls()) == ["api_auth_refused", "claim_failed"]
