"""Before `pulumi up`: is the stack's required config there? If not, print the exact
`pulumi config set` commands that fix it (instead of the CLI's generic error).

    python -m ops.preflight --stack dev      (exit 0: ready, 1: commands printed)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from components.config import PROJECT
from ops.stack import StackError, run_pulumi

#: RFC 5737 documentation ranges: Pulumi.dev.yaml's placeholder reaches nothing.
DOC_RANGES = tuple(
    ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
ADMIN_CIDR_FIX = (
    f"pulumi config set --path '{PROJECT}:adminCidrs[0]' \"$(curl -s https://ifconfig.me)/32\""
)


def _value(entry: Any) -> Any:
    """A `pulumi config --json` entry's value (objectValue for lists); None when unset."""
    if not isinstance(entry, Mapping):
        return None
    if entry.get("secret") and "value" not in entry:
        return "<secret>"  # set; its value is not shown without --show-secrets
    return entry.get("objectValue", entry.get("value"))


def fixes(config: Mapping[str, Any], stack: str) -> list[tuple[str, str]]:
    """(what is wrong, the command that fixes it) for a `pulumi config --json` document.

    The CLI prints the project's own keys without their namespace ("adminCidrs") and
    others with it ("hcloud:token"); a secret's value is left out without --show-secrets
    (pulumi/pkg/cmd/pulumi/config.go, configValueJSON).
    """

    def get(key: str) -> Any:
        name = key.removeprefix(f"{PROJECT}:")
        return _value(config.get(name, config.get(key)))

    out: list[tuple[str, str]] = []
    opt = f" --stack {stack}"
    cidrs = get(f"{PROJECT}:adminCidrs")
    if isinstance(cidrs, str):
        try:
            cidrs = json.loads(cidrs)
        except ValueError:
            cidrs = [cidrs]
    if not cidrs:
        out.append(("adminCidrs is not set (who may SSH in)", ADMIN_CIDR_FIX + opt))
    elif all(_in_doc_range(c) for c in cidrs):
        out.append(("adminCidrs is still the documentation placeholder", ADMIN_CIDR_FIX + opt))
    if not get("hcloud:token"):
        out.append(
            (
                "hcloud:token is not set (your Hetzner Cloud API token; prompted, not echoed)",
                f"pulumi config set --secret hcloud:token{opt}",
            )
        )
    public = get(f"{PROJECT}:sshPublicKey")
    private = get(f"{PROJECT}:sshPrivateKey")
    if public and not private:
        out.append(
            (
                "sshPublicKey is set without its private half",
                f"pulumi config set --secret {PROJECT}:sshPrivateKey{opt} < ~/.ssh/id_ed25519",
            )
        )
    if private and not public:
        out.append(
            (
                "sshPrivateKey is set without its public half",
                f'pulumi config set {PROJECT}:sshPublicKey{opt} "$(cat ~/.ssh/id_ed25519.pub)"',
            )
        )
    return out


def _in_doc_range(cidr: Any) -> bool:
    try:
        net = ipaddress.ip_network(str(cidr), strict=False)
    except ValueError:
        return False
    return any(isinstance(net, ipaddress.IPv4Network) and net.subnet_of(d) for d in DOC_RANGES)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    args = parser.parse_args(argv)
    try:
        proc = run_pulumi("config", "--json", "--stack", args.stack)
    except StackError as err:
        print(f"preflight: {err}", file=sys.stderr)
        return 2
    if proc.returncode != 0:
        print(f"preflight: pulumi config failed: {proc.stderr.strip()[:500]}", file=sys.stderr)
        return 2
    found = fixes(json.loads(proc.stdout or "{}"), args.stack)
    if not found:
        return 0
    print(f"Stack {args.stack} is missing required config. Run:\n", file=sys.stderr)
    for what, command in found:
        print(f"  # {what}\n  {command}\n", file=sys.stderr)
    print("then `make up` again.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
