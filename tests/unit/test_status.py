"""ops.status without servers: how it asks (one API GET, every server at once, bounded)
and how it reads answers. The LB answers are shaped as `hcloud-ha-web-metrics status`
prints them; the local cloud tier runs the real thing (tests/cloud/test_status.py)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from components.render import METRICS_SCRIPT
from ops.stack import Result, StackOutputs
from ops.status import collect, failovers

OUTPUTS = StackOutputs.from_json(
    {
        "floating_ip": "192.0.2.44",
        "public_ipv4": {"lb1": "a", "lb2": "b", "web1": "c", "web10": "e", "web2": "d"},
        "private_ip": {},
        "server_id": {"lb1": 11, "lb2": 12, "web1": 21, "web2": 22, "web10": 30},
    }
)
WEB_OK = "## units\nactive\nactive\n## failed\n## reboot\nno\n"


def lb_answer(name: str, state: str, api: dict[str, Any] | None = None) -> str:
    doc: dict[str, Any] = {
        "host": name,
        "vrrp_state": state,
        "priority": 150,
        "backends": {"servers": {w: "UP" for w in ("web1", "web2", "web10")}},
        "units": {},
        "certs": {},
    }
    if api is not None:
        doc["api"] = api
    return json.dumps(doc)


class FakeServers:
    """Answers like the servers would; records what it was asked, and when."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.concurrent = 0
        self.max_concurrent = 0

    def __call__(self, host: str, command: str, timeout: float) -> Result:
        with self.lock:
            self.asked.append((host, command))
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        time.sleep(0.05)
        with self.lock:
            self.concurrent -= 1
        answer = self.answers[host]
        return answer(command) if callable(answer) else answer


def lb(name: str, state: str, owner: int) -> Any:
    return lambda c: Result(
        0, lb_answer(name, state, {"server": owner} if "--api" in c else None), ""
    )


def healthy() -> dict[str, Any]:
    return {
        "lb1": lb("lb1", "MASTER", 11),
        "lb2": lb("lb2", "BACKUP", 11),
        **{w: Result(0, WEB_OK, "") for w in ("web1", "web2", "web10")},
    }


def test_every_server_is_asked_at_once_and_the_api_only_once() -> None:
    servers = FakeServers(healthy())
    report = collect(OUTPUTS, servers)
    assert report["problems"] == [] and report["api_owner"] == "lb1"
    assert sorted(h for h, _ in servers.asked) == ["lb1", "lb2", "web1", "web10", "web2"]
    assert [h for h, c in servers.asked if "--api" in c] == ["lb1"]
    assert servers.max_concurrent == 5
    assert f"{METRICS_SCRIPT} status --api" == dict(servers.asked)["lb1"]


def test_a_silent_server_is_named_and_lb2_asks_the_api_when_lb1_cannot() -> None:
    answers = healthy()
    answers["lb1"] = Result(124, "", "no answer within 10s")
    answers["lb2"] = lb("lb2", "MASTER", 12)
    servers = FakeServers(answers)
    report = collect(OUTPUTS, servers)
    assert "lb1 did not answer: no answer within 10s" in report["problems"]
    assert [h for h, c in servers.asked if "--api" in c] == ["lb1", "lb2"]
    assert report["api_owner"] == "lb2"
    assert report["ok"] is False


def test_failovers_pair_the_old_and_new_master_whichever_line_came_first() -> None:
    hosts = {
        "lb1": {
            "transitions": [
                [100.0, "lb1 INIT -> BACKUP priority 150"],
                [101.0, "lb1 BACKUP -> MASTER priority 151"],
                [200.30, "lb1 MASTER -> FAULT priority 0"],  # logged after lb2's line
                [300.0, "lb1 FAULT -> BACKUP priority 150"],
                [300.1, "lb1 BACKUP -> MASTER priority 151"],
            ],
            "failover": {"last_claim": {"started": 300.15, "ended": 301.0, "result": "assigned"}},
        },
        "lb2": {
            "transitions": [
                [100.0, "lb2 INIT -> BACKUP priority 100"],
                [200.25, "lb2 BACKUP -> MASTER priority 101"],
                [300.2, "lb2 MASTER -> BACKUP priority 100"],
            ],
            "claims_assigned": [[200.9, "floating IP 4711 is assigned to server 12"]],
        },
    }
    moves = failovers(hosts)
    assert [(m["from"], m["to"]) for m in moves] == [("lb2", "lb1"), ("lb1", "lb2"), (None, "lb1")]
    assert moves[0]["claim_seconds"] == 0.85  # from the failover script's state file
    assert moves[1]["claim_seconds"] == 0.65  # from its journal line
