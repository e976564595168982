"""Helpers for the render + check tier: a throw-away network namespace and sample settings."""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from components.render import RenderedFile
from tests.conftest import make_settings

__all__ = ["NetnsHost", "checker_missing", "make_settings", "write_tree"]

# Every program a validate command runs (components/render.py DAEMONS).
CHECKERS = (
    "haproxy",
    "keepalived",
    "apache2",
    "sshd",
    "apt-config",
    "openssl",
    "prometheus-node-exporter",
    "ip",
    "python3",
)


def checker_missing() -> str:
    """Why the render + check tier cannot run here, or "" when it can."""
    if os.geteuid() != 0:
        return "render+check needs root (keepalived -t runs in a network namespace)"
    missing = [
        c for c in CHECKERS if shutil.which(c) is None and not Path(f"/usr/sbin/{c}").exists()
    ]
    if missing:
        return f"render+check needs {', '.join(missing)} (as root: make system-deps)"
    return ""


def write_tree(root: Path, files: Iterable[RenderedFile]) -> None:
    """Write rendered files under `root`, at their destination paths (a staged tree)."""
    for f in files:
        target = root / f.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f.content)
        target.chmod(int(f.mode, 8))


class NetnsHost:
    """A network namespace standing in for one host; removed on exit, whatever happened.

    Addresses come from 198.18.0.0/15 only: a subnet outside it (like the default
    10.0.1.0/24) gets an interface with no address, named in the facts by the caller.
    """

    def __init__(self) -> None:
        self.name = f"hwr{secrets.token_hex(3)}"

    def __enter__(self) -> NetnsHost:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def prepare_private_interface(self, subnet_cidr: str, index: int, name: str = "") -> str:
        """Give the namespace an interface in `subnet_cidr` (lab range) and return its name."""
        iface = name or f"ens{index}"
        ip = ["ip", "-n", self.name]
        if subprocess.run([*ip, "link", "show", iface], capture_output=True).returncode != 0:
            subprocess.run(
                [*ip, "link", "add", iface, "type", "veth", "peer", "name", f"p{iface}"], check=True
            )
            subprocess.run([*ip, "link", "set", iface, "up"], check=True)
        net = ipaddress.ip_network(subnet_cidr)
        if net.subnet_of(ipaddress.ip_network("198.18.0.0/15")):
            subprocess.run(
                [
                    *ip,
                    "addr",
                    "replace",
                    f"{net.network_address + 11}/{net.prefixlen}",
                    "dev",
                    iface,
                ],
                check=True,
            )
        return iface

    def run(
        self, script: str, env: Mapping[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, "sh", "-ec", script],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            check=check,
        )
