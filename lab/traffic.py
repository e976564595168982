"""Bounded HTTP request streams from the lab's client namespace.

``python -m lab.traffic --url http://198.19.1.1/ --count 500 --duration 10`` prints one
JSON line per request: ``{"ts", "ok", "status", "served_by", "sha256", "ms", "error"}`` (``ts`` is
``time.time()`` when the answer (or the failure) arrived).  Every request opens a new
connection, so a moved route or a dead daemon shows up at once.  Both ``--count`` and
``--duration`` bound the run.

From Python: :func:`fetch` makes one request (use it through ``Host.call`` to run it in
a namespace); :class:`TrafficStream` runs the CLI inside a host namespace in the
background and parses its output; :func:`outage` measures the gap in a record list.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import http.client
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lab.netns import Host

SERVED_BY_RE = re.compile(rb'id="served-by">([A-Za-z0-9_-]+)<')
MAX_COUNT = 100_000
MAX_DURATION = 300.0


def fetch(
    url: str,
    *,
    timeout: float = 1.0,
    cookie: str | None = None,
    auth: tuple[str, str] | None = None,
    method: str = "GET",
    connect_to: str | None = None,
    cafile: str | None = None,
) -> dict[str, Any]:
    """One request on a fresh connection; never raises for network errors.

    ``https://`` URLs verify the server against ``cafile`` with the URL's host name (SNI
    and certificate check) while ``connect_to`` names the address actually dialled (the
    floating IP), as `curl --resolve` does; the record then holds the certificate's serial.
    """
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    headers = {"Connection": "close", "User-Agent": "hcloud-ha-web-lab/1"}
    if cookie:
        headers["Cookie"] = cookie
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    started = time.time()
    rec: dict[str, Any] = {"ok": False, "status": None, "served_by": None, "error": None}
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, timeout=timeout, context=ctx
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    if connect_to:
        dial = connect_to

        def create(address: tuple[str, int], *args: Any) -> socket.socket:
            return socket.create_connection((dial, address[1]), *args)

        conn._create_connection = create  # type: ignore[attr-defined]
    try:
        conn.request(method, path, headers=headers)
        if isinstance(conn.sock, ssl.SSLSocket):
            rec["cert_serial"] = (conn.sock.getpeercert() or {}).get("serialNumber")
        resp = conn.getresponse()
        body = resp.read()
        rec["status"] = resp.status
        rec["ok"] = 200 <= resp.status < 400
        match = SERVED_BY_RE.search(body)
        rec["served_by"] = match.group(1).decode() if match else None
        rec["set_cookie"] = resp.getheader("Set-Cookie")
        rec["location"] = resp.getheader("Location")
        # which content answered, wholly: a release switch must never serve a mix
        rec["sha256"] = hashlib.sha256(body).hexdigest()
    except (OSError, http.client.HTTPException) as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    rec["ts"] = time.time()
    rec["ms"] = round((rec["ts"] - started) * 1000, 2)
    return rec


def stream(
    url: str,
    *,
    count: int,
    duration: float,
    interval: float = 0.02,
    timeout: float = 0.3,
    connect_to: str | None = None,
    cafile: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Up to ``count`` requests within ``duration`` seconds, ``interval`` apart."""
    count = max(0, min(count, MAX_COUNT))
    deadline = time.monotonic() + min(duration, MAX_DURATION)
    for seq in range(count):
        if time.monotonic() >= deadline:
            return
        began = time.monotonic()
        rec = fetch(url, timeout=timeout, connect_to=connect_to, cafile=cafile)
        rec["seq"] = seq
        yield rec
        pause = interval - (time.monotonic() - began)
        if pause > 0:
            time.sleep(pause)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.traffic", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--timeout", type=float, default=0.3)
    parser.add_argument(
        "--connect-to", default=None, help="address to dial (https: SNI = URL host)"
    )
    parser.add_argument("--cacert", default=None, help="CA file for https URLs")
    args = parser.parse_args(argv)
    print(json.dumps({"event": "start", "ts": time.time()}), flush=True)
    for rec in stream(
        args.url,
        count=args.count,
        duration=args.duration,
        interval=args.interval,
        timeout=args.timeout,
        connect_to=args.connect_to,
        cafile=args.cacert,
    ):
        print(json.dumps(rec, sort_keys=True), flush=True)
    return 0


@dataclass
class Outage:
    failed: int
    total: int
    #: last success before the first failure -> first success after the last failure (s)
    gap: float
    first_failure: float | None
    recovered: bool


#: A request whose failure arrived this close to a move of the floating IP's route was in
#: flight when the route moved: its next packets went to the other LB, which knows
#: nothing of the connection. No LB can save such a request on a routed address.
AT_MOVE_SECONDS = 0.5


def at_a_move(record: dict[str, Any], moves: Sequence[float]) -> bool:
    """Did this request end within AT_MOVE_SECONDS of a route move?"""
    return any(abs(float(record["ts"]) - t) <= AT_MOVE_SECONDS for t in moves)


def outage(records: list[dict[str, Any]], since: float = 0.0) -> Outage:
    """Failed requests and the service gap in ``records`` (only those ending after ``since``)."""
    recs = [r for r in records if "ok" in r]
    fails = [r for r in recs if not r["ok"] and r["ts"] >= since]
    if not fails:
        return Outage(0, len(recs), 0.0, None, True)
    first_fail, last_fail = fails[0]["ts"], fails[-1]["ts"]
    before = [r["ts"] for r in recs if r["ok"] and r["ts"] < first_fail]
    after = [r["ts"] for r in recs if r["ok"] and r["ts"] > last_fail]
    start = before[-1] if before else first_fail
    if not after:
        return Outage(len(fails), len(recs), float("inf"), first_fail, False)
    return Outage(len(fails), len(recs), after[0] - start, first_fail, True)


class TrafficStream:
    """``python -m lab.traffic`` running in ``host``'s namespace, output to a file."""

    def __init__(
        self,
        host: Host,
        url: str,
        *,
        count: int = 2000,
        duration: float = 20.0,
        interval: float = 0.02,
        timeout: float = 0.3,
        log: Path | None = None,
        connect_to: str | None = None,
        cafile: str | None = None,
    ) -> None:
        self.host = host
        self.path = log or host.logdir / f"traffic-{time.monotonic_ns()}.jsonl"
        argv = [
            sys.executable,
            "-m",
            "lab.traffic",
            "--url",
            url,
            "--count",
            str(count),
            "--duration",
            str(duration),
            "--interval",
            str(interval),
            "--timeout",
            str(timeout),
            *(["--connect-to", connect_to] if connect_to else []),
            *(["--cacert", cafile] if cafile else []),
        ]
        repo_root = str(Path(__file__).resolve().parent.parent)
        self.proc: subprocess.Popen[Any] = host.popen(argv, log=self.path, cwd=repo_root)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line still being written
                if "ok" in rec:
                    out.append(rec)
        return out

    def started(self) -> bool:
        return self.path.exists() and '"event": "start"' in self.path.read_text(errors="replace")

    def wait_started(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            if self.records():
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise TimeoutError(f"traffic stream produced no request within {timeout}s: {self.path}")

    def wait_recovered(self, since: float, timeout: float = 10.0) -> None:
        """Bounded wait: the stream saw failures after ``since`` (epoch seconds) and then
        answers again."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            recs = [r for r in self.records() if r["ts"] >= since]
            fails = [r["ts"] for r in recs if not r["ok"]]
            if fails and any(r["ok"] and r["ts"] > fails[-1] + 0.2 for r in recs):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise TimeoutError(f"clients did not recover through the new master within {timeout}s")

    def stop(self) -> list[dict[str, Any]]:
        """Stop (if still running) and return every record."""
        self.host.kill(self.proc)
        return self.records()

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for the bounded run to end (killing it after ``timeout``), return records."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        return self.stop()


if __name__ == "__main__":
    raise SystemExit(main())
