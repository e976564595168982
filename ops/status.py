"""`make status`: is the live cluster healthy? One screen, or `--json`.

Asks every server over SSH, in parallel, each bounded by a timeout: the LBs run
`hcloud-ha-web-metrics status` (VRRP state and priority, HAProxy's view of every backend,
certificates, units, recent transitions and claims; lb1 also asks the Hetzner API, one
GET, where the floating IP is routed), the web servers a short shell probe. `collect()`
takes the stack's outputs and a runner, so the same code runs against the local cloud
cluster in tests. `assess()` names everything wrong; the exit code is 1 when anything is.

    python -m ops.status [--stack dev] [--json] [--timeout 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from components.render import METRICS_SCRIPT
from ops.stack import Result, Runner, SshRunner, StackError, StackOutputs

CERT_WARNING_DAYS = 14
LB_UNITS = ("haproxy", "keepalived", "prometheus-node-exporter")
WEB_UNITS = ("apache2", "prometheus-node-exporter")
FAILOVERS_SHOWN = 5
HANDOVER_WINDOW = 5.0
_WEB_PROBE = (
    "echo '## units'; systemctl is-active " + " ".join(WEB_UNITS) + "; "
    "echo '## failed'; systemctl list-units --failed --plain --no-legend; "
    "echo '## reboot'; if [ -e /run/reboot-required ]; then echo yes; else echo no; fi"
)
_TRANSITION_RE = re.compile(r"(\S+) (\S+) -> (MASTER|BACKUP|FAULT|STOP) priority (\d+)")

Report = dict[str, Any]


def collect(outputs: StackOutputs, run: Runner, timeout: float = 10.0) -> Report:
    """Ask every server at once; a server that does not answer in time is reported so."""
    lbs, webs = outputs.lbs, outputs.webs
    commands = {name: f"{METRICS_SCRIPT} status" for name in lbs}
    if lbs:
        commands[lbs[0]] += " --api"
    commands |= {name: _WEB_PROBE for name in webs}
    with ThreadPoolExecutor(max_workers=max(len(commands), 1)) as pool:
        futures = {n: pool.submit(run, n, c, timeout) for n, c in commands.items()}
        results = {n: f.result() for n, f in futures.items()}
    hosts: dict[str, dict[str, Any]] = {}
    for name in lbs:
        hosts[name] = _lb(results[name])
    for name in webs:
        hosts[name] = _web(results[name])
    api = hosts[lbs[0]].pop("api", None) if lbs else None
    if (api is None or "error" in api) and len(lbs) > 1 and hosts[lbs[1]]["reachable"]:
        # lb1 could not ask: ask once from lb2
        api = _lb(run(lbs[1], f"{METRICS_SCRIPT} status --api", timeout)).get("api", api)
    by_id = {sid: name for name, sid in outputs.server_id.items()}
    report: Report = {
        "time": time.time(),
        "floating_ip": outputs.floating_ip,
        "api_owner": None,
        "api_error": None,
        "hosts": hosts,
    }
    if api is None or "error" in api:
        report["api_error"] = (api or {}).get("error", "no LB could ask the API")
    elif api.get("server") is not None:
        report["api_owner"] = by_id.get(int(api["server"]), f"server {api['server']}")
    report["failovers"] = failovers(hosts)
    report["problems"], report["notes"] = assess(report)
    report["ok"] = not report["problems"]
    return report


def _unreachable(result: Result) -> dict[str, Any]:
    reason = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    return {"reachable": False, "error": reason[:200]}


def _lb(result: Result) -> dict[str, Any]:
    if result.returncode != 0:
        return _unreachable(result)
    try:
        doc: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        return {"reachable": False, "error": "status answer was not JSON"}
    doc["reachable"] = True
    doc["role"] = "lb"
    return doc


def _web(result: Result) -> dict[str, Any]:
    if result.returncode != 0 and "## reboot" not in result.stdout:
        return _unreachable(result)
    sections: dict[str, list[str]] = {}
    current = ""
    for line in result.stdout.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = []
        elif line.strip() and current:
            sections[current].append(line.strip())
    states = sections.get("units", [])
    return {
        "reachable": True,
        "role": "web",
        "units": {
            "active": dict(zip(WEB_UNITS, states, strict=False)),
            "failed": [line.split()[0] for line in sections.get("failed", [])],
        },
        "reboot_required": sections.get("reboot") == ["yes"],
    }


def failovers(hosts: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The LBs' recent moves to MASTER, newest first: time, from, to, claim duration."""
    events = []
    for name, host in hosts.items():
        for when, message in host.get("transitions") or ():
            m = _TRANSITION_RE.fullmatch(str(message))
            if m:
                events.append((float(when), name, m.group(2), m.group(3)))
    events.sort()
    moves = []
    for when, name, _before, after in events:
        if after != "MASTER":
            continue
        # The old master logs leaving MASTER around the same moment (on another host,
        # so either line may come first): the nearest such line within a few seconds.
        left = [
            (abs(w - when), n)
            for w, n, before, _after in events
            if n != name and before == "MASTER" and abs(w - when) < HANDOVER_WINDOW
        ]
        moves.append(
            {
                "time": when,
                "from": min(left)[1] if left else None,
                "to": name,
                "claim_seconds": _claim_seconds(hosts[name], when),
            }
        )
    return list(reversed(moves))[:FAILOVERS_SHOWN]


def _claim_seconds(host: Mapping[str, Any], became_master: float) -> float | None:
    """How long the claim after ``became_master`` took: the failover script's state file
    when its last claim started then, else its first "assigned" journal line after it."""
    claim = (host.get("failover") or {}).get("last_claim") or {}
    try:
        started, ended = float(claim["started"]), float(claim["ended"])
        if abs(started - became_master) < 5 and ended >= started:
            return round(ended - started, 3)
    except (KeyError, TypeError, ValueError):
        pass
    for when, _message in host.get("claims_assigned") or ():
        if 0 <= float(when) - became_master < 130:
            return round(float(when) - became_master, 3)
    return None


def assess(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, notes): every problem is a sentence naming the server and what is wrong."""
    problems: list[str] = []
    notes: list[str] = []
    hosts: Mapping[str, Mapping[str, Any]] = report["hosts"]
    now = float(report["time"])
    lbs = [n for n, h in hosts.items() if h.get("role") == "lb" or n.startswith("lb")]
    for name, host in hosts.items():
        if not host.get("reachable"):
            problems.append(f"{name} did not answer: {host.get('error')}")
    masters = [n for n in lbs if hosts[n].get("vrrp_state") == "MASTER"]
    answered = [n for n in lbs if hosts[n].get("reachable")]
    if len(masters) > 1:
        problems.append(f"two masters: {' and '.join(masters)} (split brain)")
    elif not masters and answered:
        problems.append("no LB is VRRP master")
    owner = report.get("api_owner")
    if report.get("api_error"):
        problems.append(f"cannot tell where the API routes the floating IP: {report['api_error']}")
    elif owner is None:
        problems.append("the Hetzner API routes the floating IP to no server")
    elif masters and owner not in masters:
        state = hosts.get(owner, {}).get("vrrp_state", "not an LB")
        problems.append(
            f"the Hetzner API routes the floating IP to {owner} ({state}), "
            f"not to the master {masters[0]}"
        )
    webs = [n for n, h in hosts.items() if h.get("role") == "web" or n.startswith("web")]
    for lb in answered:
        backends = hosts[lb].get("backends") or {}
        if "error" in backends:
            problems.append(f"{lb}: {backends['error']}")
            continue
        view: Mapping[str, str] = backends.get("servers", {})
        for web in webs:
            status = view.get(web)
            if status is None:
                problems.append(f"{lb}'s HAProxy does not know backend {web}")
            elif not status.startswith("UP"):
                problems.append(f"{lb}'s HAProxy sees backend {web} {status}")
        for cert, expiry in sorted((hosts[lb].get("certs") or {}).items()):
            days = (float(expiry) - now) / 86400
            if days < CERT_WARNING_DAYS:
                what = "expired" if days < 0 else f"expires in {days:.1f} days"
                problems.append(f"{lb}: certificate {cert} {what}")
    for name, host in hosts.items():
        if not host.get("reachable"):
            continue
        units = host.get("units") or {}
        expected = LB_UNITS if name in lbs else WEB_UNITS
        for unit in expected:
            state = (units.get("active") or {}).get(unit)
            if units and state != "active":
                problems.append(f"{name}: {unit} is {state or 'unknown'}")
        failed = [u for u in units.get("failed") or () if u.split(".")[0] not in expected]
        if failed:
            problems.append(f"{name}: failed unit {', '.join(failed)}")
        if host.get("reboot_required"):
            notes.append(f"{name}: reboot pending (/run/reboot-required)")
    return problems, notes


# --- one screen ----------------------------------------------------------------------


def _paint(text: str, code: str, color: bool) -> str:
    return f"\033[{code}m{text}\033[0m" if color else text


def render(report: Mapping[str, Any], color: bool = False) -> str:
    hosts: Mapping[str, Mapping[str, Any]] = report["hosts"]
    now = float(report["time"])
    owner = report.get("api_owner") or report.get("api_error") or "-"
    lines = [
        f"floating IP {report['floating_ip']} -> {owner} (Hetzner API)   "
        + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    ]
    rows = [("host", "vrrp", "prio", "daemons", "backends (HAProxy)", "cert", "reboot")]
    for name, host in hosts.items():
        if not host.get("reachable"):
            rows.append((name, "?", "", "unreachable", "", "", ""))
            continue
        units = (host.get("units") or {}).get("active") or {}
        daemons = "ok" if units and all(s == "active" for s in units.values()) else (
            " ".join(f"{u}:{s}" for u, s in units.items() if s != "active") or "?"
        )  # fmt: skip
        view = (host.get("backends") or {}).get("servers")
        backends = (
            " ".join(f"{w}:{s.split()[0] if s else '?'}" for w, s in view.items())
            if view is not None
            else ("-" if host.get("role") == "web" else "?")
        )
        certs = host.get("certs") or {}
        cert = f"{min((float(t) - now) / 86400 for t in certs.values()):.0f}d" if certs else "-"
        rows.append(
            (
                name,
                str(host.get("vrrp_state", "-")),
                str(host.get("priority") or "-"),
                daemons,
                backends,
                cert,
                "pending" if host.get("reboot_required") else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        text = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        lines.append(_paint(text, "1", color) if i == 0 else text)
    moves = report.get("failovers") or []
    if moves:
        parts = []
        for m in moves:
            when = time.strftime("%m-%d %H:%M:%S", time.gmtime(float(m["time"])))
            claim = (
                f", claim {m['claim_seconds']:.2f}s" if m.get("claim_seconds") is not None else ""
            )
            parts.append(f"{when} {m['from'] or '-'} -> {m['to']}{claim}")
        lines.append("failovers (UTC): " + "; ".join(parts))
    for note in report.get("notes") or ():
        lines.append(_paint(f"note: {note}", "33", color))
    problems = report.get("problems") or []
    if problems:
        lines += [_paint(f"WRONG: {p}", "31;1", color) for p in problems]
    else:
        lines.append(
            _paint("OK: one master, the API routes the IP to it, all backends UP", "32", color)
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make status", description=__doc__.split("\n")[0])
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    parser.add_argument("--json", action="store_true", help="one JSON document")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per server")
    args = parser.parse_args(argv)
    try:
        outputs = StackOutputs.load(args.stack)
    except (StackError, OSError, ValueError) as err:
        print(f"status: {err}", file=sys.stderr)
        return 2
    with SshRunner(outputs) as runner:
        report = collect(outputs, runner, args.timeout)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render(report, color))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
