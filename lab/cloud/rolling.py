"""Watching a rolling change on the local cloud: who is out of service, and is the end
state what a fresh deployment gives?

`OutOfService` samples, from the hosts themselves, how many LBs do not serve (host down,
HAProxy or keepalived not active) and how many web servers are not UP in each LB's
HAProxy, every `interval` seconds while a change runs. `differences_from_fresh` compares
every file every step of the current program ships with the file on its host.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from components.provision import MASK_FILE
from components.render import DAEMONS
from lab import topology as topo
from lab.cloud.apply import ApplyResult, Event
from lab.cloud.cluster import CloudCluster
from lab.cloud.common import CloudError
from lab.traffic import TrafficStream, at_a_move

#: Steps that ship files (a tar.gz on stdin): one per daemon.
DAEMON_STEPS = tuple(f"-{d.name}" for d in DAEMONS)
#: The site the day-2 scenarios run on: HTTPS from the lab's ACME CA (Pebble), the stats
#: page open to the client.
DAY2_SITE: dict[str, Any] = {
    "domains": ("site.lab.example", "www.site.lab.example"),
    "admin_cidrs": (f"{topo.CLIENT_IP}/32",),
}
#: Bound on the sampler's life.
MAX_SAMPLES = 5000


@dataclass
class Sample:
    at: float
    lbs_out: list[str]
    webs_out: dict[str, list[str]]
    """LB -> web servers not UP in its HAProxy (only LBs that serve)."""


@dataclass
class OutOfService:
    cluster: CloudCluster
    interval: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    unprobed: int = 0
    """Samples dropped because a probe did not run (ssh failed)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> OutOfService:
        self._thread = threading.Thread(target=self._loop, name="out-of-service", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _serving(self, lb: str) -> bool | None:
        """True/False; None when the probe itself did not run (ssh failed)."""
        h = self.cluster.hosts.get(lb)
        if h is None or not h.running:
            return False
        r = h.ssh(
            "systemctl is-active -q haproxy && systemctl is-active -q keepalived",
            check=False,
            timeout=10,
        )
        return None if r.returncode == 255 else r.returncode == 0

    def _loop(self) -> None:
        for _ in range(MAX_SAMPLES):
            if self._stop.is_set():
                return
            t0 = time.time()
            lbs_out, webs_out, probed = [], {}, True
            for lb in topo.LB_NAMES:
                try:
                    serving = self._serving(lb)
                    if serving is None:
                        probed = False
                        continue
                    if not serving:
                        lbs_out.append(lb)
                        continue
                    status = self.cluster.server_status(lb)
                except (CloudError, OSError, ValueError, RuntimeError):
                    probed = False  # the probe failed: this sample says nothing
                    continue
                webs_out[lb] = sorted(w for w, st in status.items() if not st.startswith("UP"))
            if probed:
                self.samples.append(Sample(t0, lbs_out, webs_out))
            else:
                self.unprobed += 1
            self._stop.wait(max(0.0, self.interval - (time.time() - t0)))

    def most_lbs_out(self) -> int:
        return max((len(s.lbs_out) for s in self.samples), default=0)

    def most_webs_out(self) -> int:
        """The most web servers out at one moment, seen by any serving LB."""
        return max((len(ws) for s in self.samples for ws in s.webs_out.values()), default=0)


def _files(stdin: str) -> dict[str, str]:
    raw = base64.b64decode(stdin)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            if f is not None:
                out["/" + member.name] = hashlib.sha256(f.read()).hexdigest()
    return out


def differences_from_fresh(cluster: CloudCluster) -> list[str]:
    """Every file the current program ships, compared with its host; plus every daemon
    active. Empty: the hosts hold exactly what a fresh deployment would give them."""
    problems: list[str] = []
    steps = cluster.plan()
    by_address = {cluster.address(n): n for n in cluster.names}
    for step in steps.values():
        host = by_address[step.host]
        if not step.name.endswith(DAEMON_STEPS):
            continue
        for path, digest in _files(step.stdin).items():
            if path.rsplit("/", 1)[-1] == MASK_FILE:  # the step's own metadata, not a file
                continue
            with contextlib.suppress(CloudError):
                got = cluster.ssh(host, f"sha256sum {path} 2>/dev/null || true").split()
                if not got or got[0] != digest:
                    problems.append(f"{host}:{path} differs from the program's")
    for name in cluster.names:
        units: tuple[str, ...] = (
            ("apache2",)
            if name.startswith("web")
            else (
                "haproxy",
                "keepalived",
            )
        )
        for unit in units:
            if not cluster.running(name, unit):
                problems.append(f"{name}: {unit} not active")
    extra = sorted(set(cluster.hosts) - set(cluster.names))
    problems += [f"{h}: still running, not in the settings" for h in extra]
    return problems


def summary(
    out: OutOfService,
    records: list[dict[str, Any]],
    https: list[dict[str, Any]] | None = None,
    moves: list[float] | None = None,
) -> dict[str, Any]:
    """What a change did to the traffic (HTTP and, with domains, HTTPS) and the hosts.

    `moves`: when the floating IP's route moved between the LBs (the fake API's routing
    log). A TCP connection open at that instant loses its path: the new LB knows nothing
    of it. Failures are counted apart by whether they happened at a move."""
    tls, moves = https or [], moves or []
    failed = {"http": [r for r in records if not r["ok"]], "https": [r for r in tls if not r["ok"]]}
    return {
        "failed_requests": len(failed["http"]) + len(failed["https"]),
        "requests": len(records) + len(tls),
        "https_requests": len(tls),
        "https_failed_requests": len(failed["https"]),
        "ip_moves": len(moves),
        "http_failed_at_ip_move": sum(at_a_move(r, moves) for r in failed["http"]),
        "https_failed_at_ip_move": sum(at_a_move(r, moves) for r in failed["https"]),
        "failed_not_at_ip_move": sum(
            not at_a_move(r, moves) for r in [*failed["http"], *failed["https"]]
        ),
        "most_lbs_out": out.most_lbs_out(),
        "most_webs_out": out.most_webs_out(),
        "samples": len(out.samples),
        "unprobed_samples": out.unprobed,
    }


@dataclass
class Change:
    """One `pulumi up` on the running cluster under traffic, and what was seen."""

    result: ApplyResult
    events: list[Event]
    seconds: float
    figures: dict[str, Any]


def rolling_change(c: CloudCluster, duration: float = 280, **settings: Any) -> Change:
    """`c.update(**settings)` while the client sends a request every 20 ms (a new
    connection each, 5 s timeout; with domains an HTTPS stream as well) and
    `OutOfService` samples the LBs; then the cluster settles (lb1 master, every web
    server UP)."""
    stream = TrafficStream(c.lab.client, c.url, duration=duration, count=100_000, timeout=5.0)
    # With domains, HTTPS too: verified against the CA with the site's name, so a host
    # serving its placeholder certificate (before its first issuance) fails a request.
    tls = (
        TrafficStream(c.lab.client, c.https_url, duration=duration, count=100_000, timeout=5.0,
                      **c.tls_stream_args())
        if c.domains
        else None
    )  # fmt: skip
    https: list[dict[str, Any]] | None = None
    try:
        stream.wait_started()
        if tls is not None:
            tls.wait_started()
        with OutOfService(c) as out:
            since = time.time()
            t0 = time.monotonic()
            result, events = c.update(**settings)
            seconds = time.monotonic() - t0
            if result.ok:
                c.wait_settled(60)
    finally:
        records = stream.stop()
        if tls is not None:
            https = tls.stop()
    moves = c.route_moves(since)
    return Change(result, events, seconds, summary(out, records, https, moves))
