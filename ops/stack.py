"""The deployed stack as an operator's tools see it: its outputs and an SSH runner.

`StackOutputs.load()` runs `pulumi stack output --json --show-secrets` with the same state
backend `make up` uses; `SshRunner` runs one command on a server as root with the stack's
key (a 0600 temporary file, removed afterwards; the key never reaches a command line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SSH_CONNECT_TIMEOUT = 5


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


#: (server name, shell command, timeout in seconds) -> what it printed. A runner that
#: cannot reach the server returns a non-zero code with the reason in stderr.
Runner = Callable[[str, str, float], Result]


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class StackOutputs:
    floating_ip: str
    public_ipv4: Mapping[str, str]
    private_ip: Mapping[str, str]
    server_id: Mapping[str, int]
    ssh_private_key: str | None = field(default=None, repr=False)

    @property
    def lbs(self) -> list[str]:
        return sorted(n for n in self.server_id if n.startswith("lb"))

    @property
    def webs(self) -> list[str]:
        return sorted((n for n in self.server_id if n.startswith("web")), key=_numbered)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackOutputs:
        try:
            return cls(
                floating_ip=str(data["floating_ip"]),
                public_ipv4={str(k): str(v) for k, v in data["public_ipv4"].items()},
                private_ip={str(k): str(v) for k, v in data["private_ip"].items()},
                server_id={str(k): int(v) for k, v in data["server_id"].items()},
                ssh_private_key=data.get("ssh_private_key") or None,
            )
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise StackError(
                f"the stack's outputs lack {err}: has `make up` completed on this stack?"
            ) from None

    @classmethod
    def load(cls, stack: str) -> StackOutputs:
        proc = run_pulumi("stack", "output", "--json", "--show-secrets", "--stack", stack)
        if proc.returncode != 0:
            raise StackError(f"pulumi stack output failed: {proc.stderr.strip()[:500]}")
        return cls.from_json(json.loads(proc.stdout))


def pulumi_cli() -> str:
    """The Pulumi CLI (a prerequisite of `make up`, not a Debian package)."""
    path = shutil.which("pulumi")
    if path is None:
        raise StackError(
            "pulumi CLI not found: install it (https://www.pulumi.com/docs/install/) and retry"
        )
    return path


def _numbered(name: str) -> tuple[str, int]:
    digits = "".join(c for c in name if c.isdigit())
    return (name.rstrip("0123456789"), int(digits or 0))


def pulumi_env() -> dict[str, str]:
    """The environment `scripts/pulumi-stack.sh` gives pulumi: local file state unless
    PULUMI_BACKEND_URL or an existing `pulumi login` says otherwise."""
    env = dict(os.environ)
    if env.get("PULUMI_BACKEND_URL"):
        return env
    try:
        logged_in = (
            subprocess.run(
                [pulumi_cli(), "whoami"], capture_output=True, timeout=30, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError, StackError):
        logged_in = False
    if not logged_in:
        env["PULUMI_BACKEND_URL"] = f"file://{REPO_ROOT / '.pulumi-state'}"
    return env


def run_pulumi(*args: str) -> subprocess.CompletedProcess[str]:
    """`pulumi ARGS` in the project with the stack's environment, bounded, not checked."""
    return subprocess.run(
        [pulumi_cli(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
        env=pulumi_env(),
    )


class SshRunner:
    """Runs commands on the stack's servers over SSH as root (a context manager: the key
    file lives while it is open). Without a key in the outputs, ssh's own identities are
    used."""

    def __init__(self, outputs: StackOutputs, known_hosts: Path | None = None) -> None:
        self.outputs = outputs
        self.known_hosts = known_hosts or REPO_ROOT / ".pulumi-state" / "known_hosts"
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.key_file: Path | None = None

    def __enter__(self) -> SshRunner:
        if self.outputs.ssh_private_key:
            self._dir = tempfile.TemporaryDirectory(prefix="hcloud-ha-web-ssh-")
            self.key_file = Path(self._dir.name) / "id"
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.outputs.ssh_private_key.rstrip("\n") + "\n")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
            self.key_file = None

    def argv(self, host: str, command: str | None = None) -> list[str]:
        address = self.outputs.public_ipv4.get(host)
        if not address:
            known = ", ".join(sorted(self.outputs.public_ipv4))
            raise StackError(f"no server named {host!r} in this stack (servers: {known})")
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "ssh",
            "-o",
            "BatchMode=yes" if command is not None else "BatchMode=no",
            "-o",
            f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
        ]
        if self.key_file is not None:
            argv += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        argv.append(f"root@{address}")
        if command is not None:
            argv.append(command)
        return argv

    def __call__(self, host: str, command: str, timeout: float) -> Result:
        try:
            proc = subprocess.run(
                self.argv(host, command),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return Result(124, "", f"no answer within {timeout:g}s")
        return Result(proc.returncode, proc.stdout, proc.stderr)
