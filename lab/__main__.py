"""``python -m lab`` (``make lab``): the HA cluster on this machine, for a person to explore.

Brings up the lab (network namespaces, fake Hetzner API, Apache, HAProxy, keepalived with
the files the program renders), prints the site and stats URLs, the stats credentials
and how to break things, then reads commands from stdin.  Everything is torn down on
``quit``, end of input, Ctrl-C or SIGTERM.  Needs root.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from lab import topology as topo
from lab.cluster import LabCluster
from lab.netns import requirements_missing
from lab.topology import LabNetwork
from lab.traffic import fetch

MAX_SESSION_SECONDS = 8 * 3600
MAX_COMMANDS = 10_000

HELP = """\
commands (type one per line):
  status                       who is VRRP master, who owns the IP, backend states
  get [N]                      N requests from the client through the floating IP
  kill-haproxy lb1|lb2         crash HAProxy (SIGKILL)      start-haproxy lb1|lb2
  kill-apache webK             crash Apache on a web server start-apache webK
  vanish lb1|lb2               the host disappears (processes killed, links down)
  return lb1|lb2               the host comes back and boots its daemons
  split / heal                 cut / restore VRRP between the LBs (split brain)
  fault KIND [KIND...]         queue fake-API faults for the next assign calls
                               (locked, rate_limit, server_error, conflict, slow, ...)
  calls                        the fake API's call log
  renew lb1|lb2                force a certificate renewal from the lab's CA (Pebble)
  cert lb1|lb2                 hcloud-ha-web-cert status on that LB
  refuse / accept              make Pebble refuse (or accept again) the lab's domains
  help, quit"""
#: The names the lab's site answers on over HTTPS (Pebble's DNS points them at the IP).
LAB_DOMAINS = ("site.lab.example", "www.site.lab.example")


def _status(c: LabCluster) -> str:
    lines = [
        f"VRRP masters: {c.masters()}   API owner: {c.assigned()}   "
        f"client route -> {c.lab.floating_ip_target()}"
    ]
    for lb in topo.LB_NAMES:
        up = {d: c.running(lb, d) for d in ("haproxy", "keepalived")}
        try:
            backends = str(c.server_status(lb))
        except OSError as exc:
            backends = f"(stats socket: {exc})"
        lines.append(f"  {lb}: {up} backends {backends}")
    for web in c.lab.webs:
        lines.append(f"  {web.name}: apache2 running={c.running(web.name, 'apache2')}")
    return "\n".join(lines)


def _get(c: LabCluster, n: int) -> str:
    out = []
    for _ in range(max(1, min(n, 100))):
        r = c.lab.client.call(fetch, c.url, timeout=1.0)
        out.append(f"  {r['status']} {r['served_by'] or r['error']}")
    return "\n".join(out)


def _run(c: LabCluster, words: list[str]) -> str:
    cmd, args = words[0], words[1:]
    one = args[0] if args else ""
    actions: dict[str, Callable[[], object]] = {
        "kill-haproxy": lambda: c.kill_haproxy(one),
        "start-haproxy": lambda: c.start_haproxy(one),
        "kill-apache": lambda: c.kill_apache(one),
        "start-apache": lambda: c.start_apache(one),
        "vanish": lambda: c.vanish(one),
        "return": lambda: c.return_host(one),
        "split": c.partition_lbs,
        "heal": c.heal_lbs,
    }
    if cmd == "help":
        return HELP
    if cmd == "status":
        return _status(c)
    if cmd == "get":
        return _get(c, int(one) if one.isdigit() else 4)
    if cmd == "calls":
        assert c.api is not None
        return "\n".join(
            f"  {x['method']} {x['path']} -> {x['status']} {x.get('fault') or ''}"
            for x in c.api.client.calls()[-30:]
        )
    if cmd in ("renew", "cert"):
        if one not in topo.LB_NAMES or c.acme is None:
            return f"{cmd} needs one of {', '.join(topo.LB_NAMES)} (and a lab with HTTPS)"
        proc = c.cert_command(one, *(("renew", "--force") if cmd == "renew" else ("status",)),
                              check=False)  # fmt: skip
        return f"{proc.stdout}{proc.stderr}(exit {proc.returncode})"
    if cmd in ("refuse", "accept") and c.acme is not None:
        for d in c.domains:
            getattr(c.acme, cmd)(d)
        return f"Pebble now {'refuses' if cmd == 'refuse' else 'accepts'} {', '.join(c.domains)}"
    if cmd == "fault":
        assert c.api is not None
        return f"queued: {c.api.client.add_faults(args)}"
    if cmd in actions:
        valid = topo.LB_NAMES if "apache" not in cmd else [w.name for w in c.lab.webs]
        if cmd not in ("split", "heal") and one not in valid:
            return f"{cmd} needs one of {', '.join(valid)}"
        actions[cmd]()
        time.sleep(0.2)
        return "done; 'status' shows the effect (failover takes a second or two)"
    return f"unknown command {cmd!r}; try 'help'"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    parser.add_argument("--webs", type=int, default=2, help="number of web servers (1-9)")
    parser.add_argument("--no-https", action="store_true", help="plain HTTP, no lab CA")
    args = parser.parse_args(argv)
    https = not args.no_https
    if https and requirements_missing(("pebble", "pebble-challtestsrv", "dehydrated")):
        print("lab: pebble/dehydrated missing (make system-deps): plain HTTP only", flush=True)
        https = False
    overrides: dict[str, Any] = (
        {"domains": LAB_DOMAINS, "admin_cidrs": (f"{topo.CLIENT_IP}/32",)} if https else {}
    )
    reason = requirements_missing()
    if reason:
        print(f"lab: cannot start: {reason}", file=sys.stderr)
        return 2
    print("lab: starting (namespaces, fake Hetzner API, daemons) ...", flush=True)
    with (
        LabNetwork(web_count=max(1, min(args.webs, 9))) as lab,
        LabCluster(lab, **overrides) as c,
    ):
        client = f"ip netns exec {lab.client.ns}"
        login = shlex.quote(f"{c.stats_user}:{c.stats_password}")
        print(lab.describe())
        if c.acme is not None:
            root = c.issuing_root
            resolve = " ".join(f"--resolve {d}:443:{topo.FLOATING_IP}" for d in c.domains)
            s_client = (
                f"openssl s_client -connect {topo.FLOATING_IP}:443"
                f" -servername {c.domains[0]} -CAfile {root}"
            )
            https_lines = "\n".join(
                [
                    "",
                    f"HTTPS:  {c.https_url}   certificate from the lab's ACME CA (Pebble)",
                    f"        {client} curl --cacert {root} {resolve} {c.https_url}",
                    f"        (any TLS tool: {client} {s_client})",
                    f"stats:  {c.stats_url}   user {c.stats_user}  password {c.stats_password!r}",
                    f"        ({client} curl --cacert {root} {resolve} -u {login} "
                    f"'{c.stats_url};csv')   (adminCidrs: the client only)",
                ]
            )
        else:
            https_lines = (
                f"\nstats:  {c.stats_url} on each LB only (no domains: not on the public "
                f"address)\n        (ip netns exec {lab.prefix}-lb1 curl -s -u "
                f"{login} '{c.stats_url};csv')"
            )
        print(
            f"""
site:   {c.url}   (from the client: {client} curl -s {c.url}){https_lines}
fake Hetzner API: {lab.api_url} (calls: {lab.workdir}/api/calls.jsonl)
daemon logs: {lab.workdir}/logs/   host roots: {c.base}/<host>/
failover script log: {c.base}/<lb>/var/log/hcloud-floating-ip.log
a shell on a host: ip netns exec {lab.prefix}-<host> bash   (hosts: {", ".join(lab.hosts)})

{HELP}
Ctrl-C or 'quit' tears everything down.""",
            flush=True,
        )
        started = time.monotonic()
        for _ in range(MAX_COMMANDS):
            if time.monotonic() - started > MAX_SESSION_SECONDS:
                print("lab: session limit reached, tearing down")
                break
            try:
                line = input("lab> ")
            except EOFError:
                break
            words = line.split()
            if not words:
                continue
            if words[0] in ("quit", "exit"):
                break
            try:
                print(_run(c, words), flush=True)
            except Exception as exc:  # a failed command must not kill the session
                print(f"error: {exc}", flush=True)
        print("lab: tearing down ...", flush=True)
    print("lab: torn down.")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("\nlab: interrupted; torn down.")
        raise SystemExit(130) from None
