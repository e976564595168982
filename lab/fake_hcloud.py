"""A fake Hetzner Cloud API (v1) for the lab: Floating IP assignment, routing, faults.

Run it inside the lab's ``api`` namespace (stdlib only)::

    python -m lab.fake_hcloud --listen 198.19.0.2:8080 --token-file F \\
        --floating-ip-id 4711 --floating-ip 198.19.1.1 \\
        --server lb1=101:198.19.0.11 --server lb2=102:198.19.0.12 \\
        --route-cmd 'ip -n hw3f9a-client route replace {ip}/32 via {server_ip} dev eth0' \\
        --log calls.jsonl

or from Python with :func:`launch` (which does the above for a ``LabNetwork``).

Hetzner-shaped endpoints (bearer token required, JSON bodies as in the docs):

* ``GET  /v1/floating_ips`` and ``GET /v1/floating_ips/{id}`` ->
  ``{"floating_ip": {"id", "ip", "server": <id or null>, ...}}``
* ``POST /v1/floating_ips/{id}/actions/assign`` body ``{"server": <id>}`` ->
  201 ``{"action": {"command": "assign_floating_ip", "status": ...}}``; the
  route command runs (that is what moves the traffic) and ``server`` changes
  when the action finishes (at once by default; ``--action-seconds`` makes it
  ``running`` for a while, during which another assign gets 423 ``locked``,
  as on Hetzner).
* ``POST /v1/floating_ips/{id}/actions/unassign``
* ``GET  /v1/actions/{id}`` and ``GET /v1/floating_ips/{id}/actions/{action_id}``

Errors use Hetzner's body ``{"error": {"code", "message", "details"}}``:
401 ``unauthorized``, 404 ``not_found``, 400 ``json_error``/``invalid_input``,
and from the fault queue: 423 ``locked``, 429 ``rate_limit_exceeded``, 409
``conflict``, 500 ``server_error``, 503 ``unavailable``, 504 ``timeout``; plus
``slow`` (answer late), ``drop`` (close without answering) and
``action_error`` (201, but the action ends in ``error`` and nothing moves),
``redirect`` (302 to ``location``) and ``non_json`` (200 with an HTML page).
A ``rate_limit`` fault may carry ``reset_in`` (seconds) or a literal ``reset``
for its ``RateLimit-Reset`` header.
Responses carry ``RateLimit-Limit/-Remaining/-Reset`` (3600/hour, one back per
second); an exhausted bucket answers 429.

Lab control (no token):

* ``POST /_control/faults`` body ``["locked", "slow", ...]`` or
  ``{"faults": [...], "replace": true}``; an item may be an object
  ``{"kind": "slow", "on": "assign"|"get"|"any", "seconds": 3}``.  Each
  request consumes the first queued fault whose ``on`` matches it (default
  ``assign``).  ``GET`` shows the queue, ``DELETE`` clears it.
* ``GET /_control/calls`` -> ``{"calls": [{"ts", "method", "path", "status",
  "server", "fault", ...}]}`` (also appended to ``--log`` as JSON lines).
* ``GET /_control/state``, ``POST /_control/config`` (``action_seconds``,
  ``slow_seconds``, ``rate_limit``), ``POST /_control/reset``,
  ``GET /_control/health``.

:class:`FakeHcloudClient` drives all of this from tests (urllib; optionally
from inside a lab namespace).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess as _sp

    from lab.topology import LabNetwork

#: fault kind -> (HTTP status, Hetzner error code, message)
ERROR_FAULTS: dict[str, tuple[int, str, str]] = {
    "locked": (423, "locked", "The item you are trying to access is locked (an Action is running)"),
    "rate_limit": (429, "rate_limit_exceeded", "Rate limit exceeded"),
    "conflict": (409, "conflict", "The resource has changed during the request, please retry"),
    "server_error": (500, "server_error", "Error within the API backend"),
    "unavailable": (503, "unavailable", "A service or product is currently not available"),
    "timeout": (504, "timeout", "The request could not be answered in time, please retry"),
}
SPECIAL_FAULTS = ("slow", "drop", "action_error", "redirect", "non_json")
FAULT_ALIASES = {
    "rate_limit_exceeded": "rate_limit",
    "429": "rate_limit",
    "423": "locked",
    "409": "conflict",
    "500": "server_error",
    "503": "unavailable",
    "504": "timeout",
}
FAULT_TARGETS = ("assign", "get", "any")
DEFAULT_SLOW_SECONDS = 2.0
DEFAULT_RATE_LIMIT = 3600
ROUTE_CMD_TIMEOUT = 5.0


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def normalize_fault(item: Any) -> dict[str, Any]:
    """A fault queue item as ``{"kind", "on", "seconds"}``; raises ``ValueError`` if unknown."""
    spec = {"kind": item} if isinstance(item, str | int) else dict(item)
    kind = str(spec.get("kind", ""))
    kind = FAULT_ALIASES.get(kind, kind)
    if kind not in ERROR_FAULTS and kind not in SPECIAL_FAULTS:
        known = ", ".join([*ERROR_FAULTS, *SPECIAL_FAULTS])
        raise ValueError(f"unknown fault {item!r}; known: {known}")
    on = spec.get("on", "assign")
    if on not in FAULT_TARGETS:
        raise ValueError(f"fault {item!r}: 'on' must be one of {', '.join(FAULT_TARGETS)}")
    out: dict[str, Any] = {"kind": kind, "on": on}
    if "seconds" in spec:
        out["seconds"] = float(spec["seconds"])
    # rate_limit: "reset_in" seconds from now, or a literal (possibly bad) "reset" header;
    # redirect: "location" (default: the same path on another port of this host).
    for key in ("reset_in", "reset", "location"):
        if key in spec:
            out[key] = float(spec[key]) if key == "reset_in" else str(spec[key])
    return out


@dataclass
class ServerSpec:
    name: str
    id: int
    ip: str

    @classmethod
    def parse(cls, text: str) -> ServerSpec:
        """``lb1=101:198.19.0.11`` -> name lb1, id 101, public IP 198.19.0.11."""
        try:
            name, rest = text.split("=", 1)
            sid, addr = rest.split(":", 1)
            return cls(name=name, id=int(sid), ip=addr)
        except ValueError:
            msg = f"--server {text!r}: expected NAME=ID:IP, e.g. lb1=101:198.19.0.11"
            raise ValueError(msg) from None


@dataclass
class Action:
    id: int
    command: str
    server: int | None
    floating_ip_id: int
    started: float
    finishes: float
    status: str = "running"
    finished: float | None = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        resources: list[dict[str, Any]] = []
        if self.server is not None:
            resources.append({"id": self.server, "type": "server"})
        resources.append({"id": self.floating_ip_id, "type": "floating_ip"})
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": 100 if self.status != "running" else 0,
            "started": _iso(self.started),
            "finished": _iso(self.finished),
            "resources": resources,
            "error": self.error,
        }


@dataclass
class State:
    """Everything the fake API knows; all access under ``lock``."""

    token: str
    floating_ip_id: int
    floating_ip: str
    servers: dict[int, ServerSpec]
    assigned: int | None
    route_cmd: list[str] | None = None
    unroute_cmd: list[str] | None = None
    log_path: Path | None = None
    action_seconds: float = 0.0
    slow_seconds: float = DEFAULT_SLOW_SECONDS
    rate_limit: int = DEFAULT_RATE_LIMIT
    lock: threading.RLock = field(default_factory=threading.RLock)
    faults: list[dict[str, Any]] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    actions: dict[int, Action] = field(default_factory=dict)
    next_action_id: int = 1000
    created: float = field(default_factory=time.time)
    bucket: float = -1.0
    bucket_at: float = field(default_factory=time.monotonic)
    timers: list[threading.Timer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.bucket < 0:
            self.bucket = float(self.rate_limit)

    # -- rate limiting (Hetzner: N/hour, one back every 3600/N seconds) -----
    def take_token(self) -> tuple[bool, int, int]:
        with self.lock:
            now = time.monotonic()
            refill = (now - self.bucket_at) * self.rate_limit / 3600.0
            self.bucket = min(float(self.rate_limit), self.bucket + refill)
            self.bucket_at = now
            ok = self.bucket >= 1.0
            if ok:
                self.bucket -= 1.0
            remaining = int(self.bucket)
            missing = self.rate_limit - self.bucket
            reset = int(time.time() + missing * 3600.0 / max(1, self.rate_limit))
            return ok, remaining, reset

    def pop_fault(self, target: str) -> dict[str, Any] | None:
        with self.lock:
            for i, fault in enumerate(self.faults):
                if fault["on"] in (target, "any"):
                    return self.faults.pop(i)
        return None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(entry)
            if self.log_path is not None:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry, sort_keys=True) + "\n")

    def floating_ip_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "id": self.floating_ip_id,
                "name": f"lab-floating-ip-{self.floating_ip_id}",
                "description": "hcloud-ha-web lab",
                "ip": self.floating_ip,
                "type": "ipv4",
                "server": self.assigned,
                "dns_ptr": [{"ip": self.floating_ip, "dns_ptr": "lab.invalid"}],
                "home_location": {
                    "id": 1,
                    "name": "fsn1",
                    "description": "Falkenstein DC Park 1",
                    "country": "DE",
                    "city": "Falkenstein",
                    "latitude": 50.47612,
                    "longitude": 12.370071,
                    "network_zone": "eu-central",
                },
                "blocked": False,
                "protection": {"delete": False},
                "labels": {"managed-by": "hcloud-ha-web-lab"},
                "created": _iso(self.created),
            }

    def running_action(self) -> Action | None:
        with self.lock:
            for action in self.actions.values():
                if action.status == "running":
                    return action
        return None

    def start_action(self, command: str, server: int | None, fail: bool) -> Action:
        with self.lock:
            now = time.time()
            action = Action(
                id=self.next_action_id,
                command=command,
                server=server,
                floating_ip_id=self.floating_ip_id,
                started=now,
                finishes=now + self.action_seconds,
            )
            self.next_action_id += 1
            self.actions[action.id] = action
        if self.action_seconds <= 0:
            self.finish_action(action.id, fail)
        else:
            timer = threading.Timer(self.action_seconds, self.finish_action, (action.id, fail))
            timer.daemon = True
            with self.lock:
                self.timers.append(timer)
            timer.start()
        return action

    def finish_action(self, action_id: int, fail: bool) -> None:
        with self.lock:
            action = self.actions[action_id]
            if action.status != "running":
                return
        error: dict[str, str] | None = None
        if fail:
            error = {"code": "action_failed", "message": "Action failed (injected fault)"}
        else:
            error = self._apply_routing(action)
        with self.lock:
            action.finished = time.time()
            if error is None:
                action.status = "success"
                self.assigned = action.server if action.command == "assign_floating_ip" else None
            else:
                action.status = "error"
                action.error = error

    def _apply_routing(self, action: Action) -> dict[str, str] | None:
        template = self.route_cmd if action.command == "assign_floating_ip" else self.unroute_cmd
        if not template:
            return None
        spec = self.servers.get(action.server) if action.server is not None else None
        values = {
            "ip": self.floating_ip,
            "server_id": "" if spec is None else str(spec.id),
            "server_ip": "" if spec is None else spec.ip,
            "server_name": "" if spec is None else spec.name,
        }
        argv = [part.format(**values) for part in template]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=ROUTE_CMD_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"code": "action_failed", "message": f"routing failed: {exc}"}
        self.record(
            {
                "ts": time.time(),
                "method": "ROUTE",
                "path": " ".join(argv),
                "status": proc.returncode,
                "server": action.server,
                "action_id": action.id,
                "stderr": proc.stderr.strip(),
            }
        )
        if proc.returncode != 0:
            return {"code": "action_failed", "message": f"routing failed: {proc.stderr.strip()}"}
        return None

    def cancel_timers(self) -> None:
        with self.lock:
            for timer in self.timers:
                timer.cancel()
            self.timers.clear()


@dataclass(frozen=True)
class RawBody:
    """A non-JSON answer (the faults ``redirect`` and ``non_json``)."""

    data: bytes
    content_type: str


class Handler(BaseHTTPRequestHandler):
    server_version = "fake-hcloud/1"
    protocol_version = "HTTP/1.1"
    state: State  # set on the subclass made by make_server

    # quiet: the call log is the record
    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- plumbing -----------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, RawBody):
            data, content_type = body.data, body.content_type
        else:
            data, content_type = json.dumps(body).encode() + b"\n", "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, **kw: Any) -> tuple[int, Any]:
        return status, {"error": {"code": code, "message": message, "details": kw or {}}}

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_body()
        if path.startswith("/_control"):
            status, payload = self._control(method, path, body)
            self._send(status, payload)
            return
        entry: dict[str, Any] = {
            "ts": time.time(),
            "method": method,
            "path": path,
            "remote": self.client_address[0],
            "server": None,
            "fault": None,
        }
        headers: dict[str, str] = {}
        try:
            status, payload, drop = self._api(method, path, body, entry, headers)
        except Exception as exc:  # a bug here must still answer, Hetzner-shaped
            status, payload = self._error(500, "server_error", f"fake API bug: {exc}")
            drop = False
        entry["status"] = 0 if drop else status
        self.state.record(entry)
        if drop:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(status, payload, headers)

    # -- the Hetzner API ------------------------------------------------------
    def _api(
        self,
        method: str,
        path: str,
        body: bytes,
        entry: dict[str, Any],
        headers: dict[str, str],
    ) -> tuple[int, Any, bool]:
        st = self.state
        ok, remaining, reset = st.take_token()
        headers.update(
            {
                "RateLimit-Limit": str(st.rate_limit),
                "RateLimit-Remaining": str(remaining),
                "RateLimit-Reset": str(reset),
            }
        )
        if not ok:
            entry["fault"] = "rate_limit_bucket"
            return (*self._error(429, "rate_limit_exceeded", "Rate limit exceeded"), False)
        auth = self.headers.get("Authorization", "")
        if auth != f"Bearer {st.token}":
            return (
                *self._error(
                    401, "unauthorized", "Request was made with an invalid or unknown token"
                ),
                False,
            )
        parts = path.strip("/").split("/")
        if not parts or parts[0] != "v1":
            return (*self._error(404, "not_found", f"no such endpoint {path}"), False)
        parts = parts[1:]
        if method == "POST" and body:
            try:
                data = json.loads(body)
                if isinstance(data, dict):
                    entry["server"] = data.get("server")
            except ValueError:
                pass
        target = "assign" if method == "POST" else "get"
        fault = st.pop_fault(target)
        if fault is not None:
            entry["fault"] = fault["kind"]
            kind = fault["kind"]
            if kind in ERROR_FAULTS:
                status, code, message = ERROR_FAULTS[kind]
                if "reset_in" in fault:
                    headers["RateLimit-Reset"] = str(int(time.time() + fault["reset_in"]))
                if "reset" in fault:
                    headers["RateLimit-Reset"] = fault["reset"]
                return (*self._error(status, code, message), False)
            if kind == "redirect":
                host = self.headers.get("Host", "localhost").split(":")[0]
                headers["Location"] = fault.get("location", f"http://{host}:1{self.path}")
                return 302, RawBody(b"moved\n", "text/plain"), False
            if kind == "non_json":
                page = b"<html><body>Maintenance</body></html>\n"
                return 200, RawBody(page, "text/html"), False
            if kind == "drop":
                return 0, None, True
            if kind == "slow":
                time.sleep(max(0.0, fault.get("seconds", st.slow_seconds)))
        fail_action = fault is not None and fault["kind"] == "action_error"
        return (*self._route(method, parts, body, entry, fail_action), False)

    def _route(
        self, method: str, parts: list[str], body: bytes, entry: dict[str, Any], fail: bool
    ) -> tuple[int, Any]:
        st = self.state
        if parts and parts[0] == "actions" and len(parts) == 2 and method == "GET":
            return self._get_action(parts[1])
        if not parts or parts[0] != "floating_ips":
            return self._error(404, "not_found", "no such endpoint")
        if len(parts) == 1 and method == "GET":
            fip = st.floating_ip_json()
            meta = {
                "pagination": {
                    "page": 1,
                    "per_page": 25,
                    "previous_page": None,
                    "next_page": None,
                    "last_page": 1,
                    "total_entries": 1,
                }
            }
            return 200, {"floating_ips": [fip], "meta": meta}
        if not parts[1].isdigit() or int(parts[1]) != st.floating_ip_id:
            return self._error(404, "not_found", f"Floating IP with ID {parts[1]} not found")
        if len(parts) == 2 and method == "GET":
            return 200, {"floating_ip": st.floating_ip_json()}
        if len(parts) == 4 and parts[2] == "actions" and method == "GET":
            return self._get_action(parts[3])
        if len(parts) == 4 and parts[2] == "actions" and method == "POST":
            if parts[3] == "assign":
                return self._assign(body, entry, fail)
            if parts[3] == "unassign":
                return self._start("unassign_floating_ip", None, fail)
        return self._error(404, "not_found", "no such endpoint")

    def _get_action(self, text: str) -> tuple[int, Any]:
        with self.state.lock:
            action = self.state.actions.get(int(text)) if text.isdigit() else None
            if action is None:
                return self._error(404, "not_found", f"Action with ID {text} not found")
            return 200, {"action": action.to_json()}

    def _assign(self, body: bytes, entry: dict[str, Any], fail: bool) -> tuple[int, Any]:
        try:
            data = json.loads(body or b"null")
        except ValueError as exc:
            return self._error(400, "json_error", f"invalid JSON: {exc}")
        if not isinstance(data, dict) or "server" not in data:
            return self._error(
                400,
                "invalid_input",
                "invalid input in field 'server': is missing",
                fields=[{"name": "server", "messages": ["is missing"]}],
            )
        server = data["server"]
        entry["server"] = server
        if not isinstance(server, int) or isinstance(server, bool):
            return self._error(
                400,
                "invalid_input",
                "invalid input in field 'server': must be an integer",
                fields=[{"name": "server", "messages": ["must be an integer"]}],
            )
        spec = self.state.servers.get(server)
        if spec is None:
            return self._error(404, "not_found", f"Server with ID {server} not found")
        entry["server_name"] = spec.name
        return self._start("assign_floating_ip", server, fail)

    def _start(self, command: str, server: int | None, fail: bool) -> tuple[int, Any]:
        st = self.state
        with st.lock:
            if st.running_action() is not None:
                return self._error(423, "locked", "Floating IP is locked: an Action is running")
            action = st.start_action(command, server, fail)
            return 201, {"action": action.to_json()}

    # -- lab control ------------------------------------------------------------
    def _control(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        st = self.state
        try:
            data = json.loads(body) if body else None
        except ValueError as exc:
            return 400, {"error": {"code": "json_error", "message": str(exc)}}
        what = path[len("/_control") :].strip("/")
        if what == "health":
            return 200, {"ok": True}
        if what == "calls" and method == "GET":
            with st.lock:
                return 200, {"calls": list(st.calls)}
        if what == "faults":
            if method == "GET":
                with st.lock:
                    return 200, {"faults": list(st.faults)}
            if method == "DELETE":
                with st.lock:
                    st.faults.clear()
                return 200, {"faults": []}
            if method == "POST":
                replace = False
                items = data
                if isinstance(data, dict):
                    items, replace = data.get("faults", []), bool(data.get("replace"))
                if not isinstance(items, list):
                    return 400, {"error": {"code": "invalid_input", "message": "expected a list"}}
                try:
                    faults = [normalize_fault(item) for item in items]
                except ValueError as exc:
                    return 400, {"error": {"code": "invalid_input", "message": str(exc)}}
                with st.lock:
                    if replace:
                        st.faults.clear()
                    st.faults.extend(faults)
                    return 200, {"faults": list(st.faults)}
        if what == "state" and method == "GET":
            with st.lock:
                return 200, {
                    "floating_ip": st.floating_ip_json(),
                    "assigned_name": st.servers[st.assigned].name
                    if st.assigned in st.servers
                    else None,
                    "servers": {s.name: {"id": s.id, "ip": s.ip} for s in st.servers.values()},
                    "faults": list(st.faults),
                    "actions": [a.to_json() for a in st.actions.values()],
                    "config": {
                        "action_seconds": st.action_seconds,
                        "slow_seconds": st.slow_seconds,
                        "rate_limit": st.rate_limit,
                    },
                }
        if what == "config" and method == "POST" and isinstance(data, dict):
            with st.lock:
                if "action_seconds" in data:
                    st.action_seconds = float(data["action_seconds"])
                if "slow_seconds" in data:
                    st.slow_seconds = float(data["slow_seconds"])
                if "rate_limit" in data:
                    st.rate_limit = int(data["rate_limit"])
                    st.bucket = float(st.rate_limit)
            return 200, {"ok": True}
        if what == "reset" and method == "POST":
            with st.lock:
                st.faults.clear()
                st.calls.clear()
                st.bucket = float(st.rate_limit)
            return 200, {"ok": True}
        return 404, {"error": {"code": "not_found", "message": f"no control endpoint {path}"}}


class FakeHcloudServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State


def make_server(host: str, port: int, state: State) -> FakeHcloudServer:
    """An HTTP server bound to ``host:port`` serving ``state`` (call ``serve_forever``)."""
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = FakeHcloudServer((host, port), handler)
    server.state = state
    return server


def _parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen {text!r}: expected HOST:PORT")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.fake_hcloud", description="Fake Hetzner Cloud API for the lab."
    )
    parser.add_argument("--listen", type=_parse_listen, default=("198.19.0.2", 8080))
    parser.add_argument("--token-file", required=True, type=Path)
    parser.add_argument("--floating-ip-id", type=int, default=4711)
    parser.add_argument("--floating-ip", default="198.19.1.1")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        type=ServerSpec.parse,
        help="NAME=ID:PUBLIC_IP, repeatable",
    )
    parser.add_argument(
        "--assigned", default=None, help="server name or id assigned at start (default: first)"
    )
    parser.add_argument("--route-cmd", default=None, help="argv template run on assign")
    parser.add_argument("--unroute-cmd", default=None, help="argv template run on unassign")
    parser.add_argument("--action-seconds", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=DEFAULT_SLOW_SECONDS)
    parser.add_argument("--rate-limit", type=int, default=DEFAULT_RATE_LIMIT)
    parser.add_argument("--log", type=Path, default=None, help="JSON-lines call log")
    args = parser.parse_args(argv)

    token = args.token_file.read_text(encoding="utf-8").strip()
    if not token:
        parser.error(f"token file {args.token_file} is empty")
    servers = {s.id: s for s in args.server}
    assigned: int | None = args.server[0].id if args.server else None
    if args.assigned is not None:
        if args.assigned.lower() in ("none", "null", ""):
            assigned = None
        else:
            by_name = {s.name: s.id for s in args.server}
            key = args.assigned
            assigned = by_name[key] if key in by_name else int(key)
    state = State(
        token=token,
        floating_ip_id=args.floating_ip_id,
        floating_ip=args.floating_ip,
        servers=servers,
        assigned=assigned,
        route_cmd=shlex.split(args.route_cmd) if args.route_cmd else None,
        unroute_cmd=shlex.split(args.unroute_cmd) if args.unroute_cmd else None,
        log_path=args.log,
        action_seconds=args.action_seconds,
        slow_seconds=args.slow_seconds,
        rate_limit=args.rate_limit,
    )
    host, port = args.listen
    server = make_server(host, port, state)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fake hcloud API on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        state.cancel_timers()
        server.server_close()
    return 0


# --------------------------------------------------------------------------
# client helper for tests


class ApiResponse:
    """Status, headers and decoded JSON body of one request."""

    def __init__(self, status: int, headers: dict[str, str], body: Any) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def error_code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            code = self.body["error"].get("code")
            return str(code) if code is not None else None
        return None

    def __repr__(self) -> str:
        return f"ApiResponse({self.status}, {self.body!r})"


class FakeHcloudClient:
    """Drive the fake API (and its control endpoints) with urllib.

    ``base_url`` is the server root, e.g. ``http://198.19.0.2:8080``.  If
    ``netns`` is given, every request runs in a thread switched into that
    network namespace (see ``lab.netns.call_in_netns``); the test process
    itself lives in the root namespace, which cannot reach the lab.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        netns: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.netns = netns
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        auth: bool = True,
        timeout: float | None = None,
    ) -> ApiResponse:
        """One request; HTTP errors come back as an ``ApiResponse`` too (not raised)."""
        return self._in_ns(self._request, method, path, body, token, auth, timeout)

    def _in_ns(self, fn: Callable[..., ApiResponse], *args: Any) -> ApiResponse:
        if self.netns is None:
            return fn(*args)
        from lab.netns import call_in_netns

        return call_in_netns(self.netns, fn, *args, timeout=self.timeout * 3 + 5)

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        token: str | None,
        auth: bool,
        timeout: float | None,
    ) -> ApiResponse:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        tok = token if token is not None else self.token
        if auth and tok is not None:
            req.add_header("Authorization", f"Bearer {tok}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                raw = resp.read()
                return ApiResponse(resp.status, dict(resp.headers.items()), _json(raw))
        except urllib.error.HTTPError as err:
            raw = err.read()
            return ApiResponse(err.code, dict(err.headers.items()), _json(raw))

    # -- Hetzner API -----------------------------------------------------------
    def get_floating_ip(self, floating_ip_id: int = 4711) -> ApiResponse:
        return self.request("GET", f"/v1/floating_ips/{floating_ip_id}")

    def assign(self, server: Any, floating_ip_id: int = 4711) -> ApiResponse:
        return self.request(
            "POST", f"/v1/floating_ips/{floating_ip_id}/actions/assign", {"server": server}
        )

    def unassign(self, floating_ip_id: int = 4711) -> ApiResponse:
        return self.request("POST", f"/v1/floating_ips/{floating_ip_id}/actions/unassign")

    def get_action(self, action_id: int) -> ApiResponse:
        return self.request("GET", f"/v1/actions/{action_id}")

    def assigned_server(self, floating_ip_id: int = 4711) -> int | None:
        resp = self.get_floating_ip(floating_ip_id)
        if resp.status != 200:
            raise RuntimeError(f"GET floating IP failed: {resp!r}")
        server = resp.body["floating_ip"]["server"]
        return None if server is None else int(server)

    # -- control -----------------------------------------------------------------
    def _control(self, method: str, what: str, body: Any = None) -> Any:
        resp = self.request(method, f"/_control/{what}", body, auth=False)
        if resp.status != 200:
            raise RuntimeError(f"control {method} {what} failed: {resp!r}")
        return resp.body

    def health(self) -> bool:
        try:
            return bool(self._control("GET", "health").get("ok"))
        except (OSError, RuntimeError):
            return False

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll ``/_control/health`` until it answers (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if self.health():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise TimeoutError(f"fake hcloud API at {self.base_url} not ready after {timeout}s")

    def set_faults(self, faults: list[Any], *, replace: bool = True) -> list[dict[str, Any]]:
        """Queue faults (``"locked"``, ``{"kind": "slow", "seconds": 3}``, ...)."""
        body = self._control("POST", "faults", {"faults": faults, "replace": replace})
        return list(body["faults"])

    def add_faults(self, faults: list[Any]) -> list[dict[str, Any]]:
        return self.set_faults(faults, replace=False)

    def faults(self) -> list[dict[str, Any]]:
        return list(self._control("GET", "faults")["faults"])

    def clear_faults(self) -> None:
        self._control("DELETE", "faults")

    def calls(self) -> list[dict[str, Any]]:
        return list(self._control("GET", "calls")["calls"])

    def state(self) -> dict[str, Any]:
        return dict(self._control("GET", "state"))

    def configure(self, **config: Any) -> None:
        """Set ``action_seconds``, ``slow_seconds`` or ``rate_limit`` at runtime."""
        self._control("POST", "config", config)

    def reset(self) -> None:
        """Forget calls and faults (keeps the assignment)."""
        self._control("POST", "reset", {})


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode(errors="replace")


# --------------------------------------------------------------------------
# starting it in a lab


@dataclass
class FakeApi:
    """A running fake API inside a lab (see :func:`launch`)."""

    proc: _sp.Popen[Any]
    url: str  #: API endpoint as the notify script wants it, e.g. http://198.19.0.2:8080/v1
    token: str
    token_file: Path
    log_path: Path
    client: FakeHcloudClient  #: runs its requests from the ``api`` namespace


def launch(
    lab: LabNetwork,
    *,
    token: str = "lab-token-0123456789",
    assigned: str = "lb1",
    action_seconds: float = 0.0,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 10.0,
) -> FakeApi:
    """Start the fake API in ``lab.api`` wired to the lab's client route; wait until it answers.

    The process is tracked by the ``api`` host and stopped at lab teardown.
    """
    from lab import topology as topo

    apidir = lab.workdir / "api"
    apidir.mkdir(parents=True, exist_ok=True)
    token_file = apidir / "token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n", encoding="utf-8")
    log_path = apidir / "calls.jsonl"
    argv = [
        sys.executable,
        "-m",
        "lab.fake_hcloud",
        "--listen",
        f"{topo.API_IP}:{topo.API_PORT}",
        "--token-file",
        str(token_file),
        "--floating-ip-id",
        str(topo.FLOATING_IP_ID),
        "--floating-ip",
        topo.FLOATING_IP,
        "--route-cmd",
        lab.route_command(),
        "--unroute-cmd",
        lab.unroute_command(),
        "--assigned",
        assigned,
        "--action-seconds",
        str(action_seconds),
        "--log",
        str(log_path),
    ]
    for name in topo.LB_NAMES:
        argv += ["--server", f"{name}={topo.LB_SERVER_IDS[name]}:{topo.LB_PUBLIC_IPS[name]}"]
    argv += list(extra_args)
    repo_root = str(Path(__file__).resolve().parent.parent)
    if assigned in topo.LB_NAMES:
        lab.route_floating_ip_to(assigned)
    proc = lab.api.popen(argv, cwd=repo_root, log=apidir / "fake_hcloud.log")
    client = FakeHcloudClient(f"http://{topo.API_IP}:{topo.API_PORT}", token, netns=lab.api.ns)
    try:
        client.wait_ready(ready_timeout)
    except TimeoutError:
        lab.api.kill(proc)
        log = (apidir / "fake_hcloud.log").read_text(errors="replace")
        raise TimeoutError(f"fake hcloud API did not come up; its log:\n{log}") from None
    return FakeApi(
        proc=proc,
        url=lab.api_url,
        token=token,
        token_file=token_file,
        log_path=log_path,
        client=client,
    )


if __name__ == "__main__":
    raise SystemExit(main())
