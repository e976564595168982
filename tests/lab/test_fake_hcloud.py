"""The fake Hetzner Cloud API: auth, assign moves the route, Hetzner-shaped faults, call log."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from lab.fake_hcloud import (
    ERROR_FAULTS,
    Action,
    FakeApi,
    FakeHcloudClient,
    ServerSpec,
    State,
    normalize_fault,
)
from lab.topology import API_IP, API_PORT, FLOATING_IP, FLOATING_IP_ID, LB_SERVER_IDS, LabNetwork

LB1, LB2 = LB_SERVER_IDS["lb1"], LB_SERVER_IDS["lb2"]

# --- no root needed --------------------------------------------------------------------


def test_fault_items_are_normalized_and_unknown_ones_refused() -> None:
    assert normalize_fault("locked") == {"kind": "locked", "on": "assign"}
    assert normalize_fault("rate_limit_exceeded")["kind"] == "rate_limit"
    assert normalize_fault({"kind": "slow", "seconds": 1, "on": "get"}) == {
        "kind": "slow",
        "on": "get",
        "seconds": 1.0,
    }
    with pytest.raises(ValueError):
        normalize_fault("meteor")
    with pytest.raises(ValueError):
        normalize_fault({"kind": "locked", "on": "everything"})


def test_server_spec_parses_name_id_and_ip() -> None:
    assert ServerSpec.parse("lb1=101:198.19.0.11") == ServerSpec("lb1", 101, "198.19.0.11")
    with pytest.raises(ValueError):
        ServerSpec.parse("lb1:101")


def test_rate_limit_bucket_empties_and_refills() -> None:
    state = State(
        token="t",
        floating_ip_id=1,
        floating_ip=FLOATING_IP,
        servers={},
        assigned=None,
        rate_limit=3600,
    )
    state.bucket = 2.0
    assert state.take_token()[0]
    assert state.take_token()[0]
    ok, remaining, _ = state.take_token()
    assert not ok and remaining == 0
    state.bucket_at -= 1.5  # 1.5 s later: one request back (3600/h = 1/s)
    assert state.take_token()[0]


def test_action_json_is_hetzner_shaped() -> None:
    action = Action(7, "assign_floating_ip", 101, 4711, started=0.0, finishes=0.0)
    body = action.to_json()
    assert body["status"] == "running" and body["progress"] == 0 and body["finished"] is None
    assert body["resources"] == [{"id": 101, "type": "server"}, {"id": 4711, "type": "floating_ip"}]
    assert body["started"] == "1970-01-01T00:00:00+00:00"


# --- lab: the real server in the lab's api namespace -------------------------------------


@pytest.fixture
def api(api_lab: tuple[LabNetwork, FakeApi]) -> Iterator[FakeApi]:
    """The shared fake API, back to a known state: assigned to lb1, no faults, empty log."""
    lab, fake = api_lab
    client = fake.client
    client.configure(action_seconds=0.0, slow_seconds=2.0, rate_limit=3600)
    client.clear_faults()
    if client.assigned_server() != LB1:
        assert client.assign(LB1).status == 201
    assert lab.floating_ip_target() == "lb1"
    client.reset()
    yield fake
    client.clear_faults()


@pytest.fixture
def lab(api_lab: tuple[LabNetwork, FakeApi]) -> LabNetwork:
    return api_lab[0]


def lb_client(lab: LabNetwork, fake: FakeApi, lb: str = "lb2") -> FakeHcloudClient:
    """A client calling from an LB's namespace, as the notify script does."""
    return FakeHcloudClient(f"http://{API_IP}:{API_PORT}", fake.token, netns=lab[lb].ns)


@pytest.mark.lab
def test_requests_without_the_right_token_get_401(lab: LabNetwork, api: FakeApi) -> None:
    client = api.client
    for resp in (
        client.request("GET", f"/v1/floating_ips/{FLOATING_IP_ID}", auth=False),
        client.request("GET", f"/v1/floating_ips/{FLOATING_IP_ID}", token="wrong"),
        client.request(
            "POST", f"/v1/floating_ips/{FLOATING_IP_ID}/actions/assign", {"server": LB2}, token="x"
        ),
    ):
        assert resp.status == 401
        assert resp.error_code == "unauthorized"
        assert set(resp.body["error"]) == {"code", "message", "details"}
    assert lab.floating_ip_target() == "lb1"


@pytest.mark.lab
def test_get_floating_ip_shows_the_assigned_server(api: FakeApi) -> None:
    resp = api.client.get_floating_ip()
    assert resp.status == 200
    fip = resp.body["floating_ip"]
    assert fip["id"] == FLOATING_IP_ID and fip["ip"] == FLOATING_IP and fip["server"] == LB1
    assert fip["type"] == "ipv4"
    listing = api.client.request("GET", "/v1/floating_ips")
    assert listing.status == 200 and listing.body["floating_ips"][0]["id"] == FLOATING_IP_ID
    for key in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
        assert key in resp.headers


@pytest.mark.lab
def test_assign_from_an_lb_moves_the_route_and_the_traffic(
    lab: LabNetwork,
    api: FakeApi,
    listeners: Callable[..., object],
    curl_fip: Callable[..., str],
) -> None:
    for lb in lab.lbs:
        listeners(lb)
    assert curl_fip(lab) == "lb1"
    resp = lb_client(lab, api, "lb2").assign(LB2)
    assert resp.status == 201
    action = resp.body["action"]
    assert action["command"] == "assign_floating_ip"
    assert action["status"] in ("running", "success")
    assert {"id": LB2, "type": "server"} in action["resources"]
    assert lab.floating_ip_target() == "lb2"
    assert curl_fip(lab) == "lb2"
    assert api.client.assigned_server() == LB2
    got = api.client.get_action(action["id"])
    assert got.status == 200 and got.body["action"]["status"] == "success"
    assert api.client.request("GET", f"/v1/floating_ips/{FLOATING_IP_ID}/actions/1").status == 404


@pytest.mark.lab
def test_unknown_ids_and_bad_bodies_get_hetzner_errors(lab: LabNetwork, api: FakeApi) -> None:
    client = api.client
    assert client.get_floating_ip(1).error_code == "not_found"
    assert client.get_floating_ip(1).status == 404
    assert client.get_action(999999).status == 404
    unknown = client.assign(555)
    assert (unknown.status, unknown.error_code) == (404, "not_found")
    missing = client.request("POST", f"/v1/floating_ips/{FLOATING_IP_ID}/actions/assign", {})
    assert (missing.status, missing.error_code) == (400, "invalid_input")
    assert missing.body["error"]["details"]["fields"][0]["name"] == "server"
    wrong_type = client.assign("lb2")
    assert (wrong_type.status, wrong_type.error_code) == (400, "invalid_input")
    assert lab.floating_ip_target() == "lb1"


@pytest.mark.lab
@pytest.mark.parametrize("kind", sorted(ERROR_FAULTS))
def test_each_error_fault_answers_hetzner_shaped_and_moves_nothing(
    lab: LabNetwork, api: FakeApi, kind: str
) -> None:
    status, code, _ = ERROR_FAULTS[kind]
    api.client.set_faults([kind])
    resp = lb_client(lab, api).assign(LB2)
    assert (resp.status, resp.error_code) == (status, code)
    assert lab.floating_ip_target() == "lb1"
    assert api.client.assigned_server() == LB1
    assert api.client.faults() == []  # consumed
    retry = lb_client(lab, api).assign(LB2)  # the queue is empty: the retry works
    assert retry.status == 201
    assert lab.floating_ip_target() == "lb2"


def test_documented_status_codes_for_the_retryable_faults() -> None:
    assert ERROR_FAULTS["locked"][:2] == (423, "locked")
    assert ERROR_FAULTS["rate_limit"][:2] == (429, "rate_limit_exceeded")
    assert ERROR_FAULTS["conflict"][:2] == (409, "conflict")
    assert ERROR_FAULTS["server_error"][0] == 500


@pytest.mark.lab
def test_faults_are_consumed_one_per_assign_in_order(lab: LabNetwork, api: FakeApi) -> None:
    api.client.set_faults(["locked", "rate_limit", "server_error"])
    got = [lb_client(lab, api).assign(LB2).status for _ in range(4)]
    assert got == [423, 429, 500, 201]
    # GETs do not consume assign faults
    api.client.set_faults(["locked"])
    assert api.client.get_floating_ip().status == 200
    assert api.client.faults() == [{"kind": "locked", "on": "assign"}]
    # ... unless the fault says so
    api.client.set_faults([{"kind": "server_error", "on": "get"}])
    assert api.client.get_floating_ip().status == 500
    assert api.client.get_floating_ip().status == 200


@pytest.mark.lab
def test_slow_fault_delays_the_answer_but_still_assigns(lab: LabNetwork, api: FakeApi) -> None:
    api.client.set_faults([{"kind": "slow", "seconds": 0.4}])
    started = time.monotonic()
    resp = lb_client(lab, api).assign(LB2)
    assert time.monotonic() - started >= 0.4
    assert resp.status == 201
    assert lab.floating_ip_target() == "lb2"


@pytest.mark.lab
def test_drop_fault_closes_the_connection_without_an_answer(lab: LabNetwork, api: FakeApi) -> None:
    api.client.set_faults(["drop"])
    with pytest.raises(OSError):  # http.client.RemoteDisconnected is a ConnectionResetError
        lb_client(lab, api).assign(LB2)
    assert lab.floating_ip_target() == "lb1"
    assert api.client.calls()[-1]["fault"] == "drop"


@pytest.mark.lab
def test_action_error_fault_accepts_then_fails_the_action(lab: LabNetwork, api: FakeApi) -> None:
    api.client.set_faults(["action_error"])
    resp = lb_client(lab, api).assign(LB2)
    assert resp.status == 201
    action = api.client.get_action(resp.body["action"]["id"]).body["action"]
    assert action["status"] == "error" and action["error"]["code"] == "action_failed"
    assert lab.floating_ip_target() == "lb1"
    assert api.client.assigned_server() == LB1


@pytest.mark.lab
def test_running_action_locks_the_floating_ip_like_hetzner(lab: LabNetwork, api: FakeApi) -> None:
    api.client.configure(action_seconds=0.3)
    first = lb_client(lab, api).assign(LB2)
    assert first.status == 201 and first.body["action"]["status"] == "running"
    assert api.client.assigned_server() == LB1  # not yet
    second = lb_client(lab, api, "lb1").assign(LB1)
    assert (second.status, second.error_code) == (423, "locked")
    deadline = time.monotonic() + 3
    while api.client.get_action(first.body["action"]["id"]).body["action"]["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert api.client.assigned_server() == LB2
    assert lab.floating_ip_target() == "lb2"


@pytest.mark.lab
def test_exhausted_rate_limit_answers_429(api: FakeApi) -> None:
    api.client.configure(rate_limit=2)
    assert api.client.get_floating_ip().status == 200
    ok = api.client.get_floating_ip()
    assert ok.status == 200 and ok.headers["RateLimit-Limit"] == "2"
    limited = api.client.get_floating_ip()
    assert (limited.status, limited.error_code) == (429, "rate_limit_exceeded")
    assert limited.headers["RateLimit-Remaining"] == "0"


@pytest.mark.lab
def test_unassign_removes_the_route(lab: LabNetwork, api: FakeApi) -> None:
    assert api.client.unassign().status == 201
    assert api.client.assigned_server() is None
    assert lab.floating_ip_target() is None
    assert api.client.assign(LB1).status == 201
    assert lab.floating_ip_target() == "lb1"


@pytest.mark.lab
def test_call_log_records_every_request_and_the_route_change(lab: LabNetwork, api: FakeApi) -> None:
    api.client.set_faults(["locked"])
    lb2 = lb_client(lab, api)
    assert lb2.assign(LB2).status == 423
    assert lb2.assign(LB2).status == 201
    assert lb2.get_floating_ip().status == 200
    calls = api.client.calls()
    requests = [c for c in calls if c["method"] != "ROUTE"]
    assert [(c["method"], c["status"], c["server"], c["fault"]) for c in requests] == [
        ("POST", 423, LB2, "locked"),
        ("POST", 201, LB2, None),
        ("GET", 200, None, None),
    ]
    assert all(c["remote"] == lab["lb2"].public_ip for c in requests)
    assert all(isinstance(c["ts"], float) for c in calls)
    routes = [c for c in calls if c["method"] == "ROUTE"]
    assert len(routes) == 1 and routes[0]["status"] == 0
    assert f"via {lab['lb2'].public_ip}" in routes[0]["path"]
    # the same entries, as JSON lines in the log file
    logged = [json.loads(line) for line in api.log_path.read_text().splitlines()]
    assert logged[-len(calls) :] == calls


@pytest.mark.lab
def test_token_file_is_private(api: FakeApi) -> None:
    assert api.token_file.stat().st_mode & 0o777 == 0o600
