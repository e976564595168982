"""Shared fixtures: Pulumi mocks that record what the engine would see, and valid settings.

`RecordingMonitor` wraps Pulumi's own `MockMonitor` and keeps every RegisterResource and
RegisterResourceOutputs request as sent by the SDK: inputs (with secret markers), parent,
dependencies and ignoreChanges. Tests assert on those, not on the program's own constants.
"""

from __future__ import annotations

import base64
import gzip
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest
from pulumi.runtime import rpc
from pulumi.runtime.sync_await import _sync_await

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components.config import PROJECT, SecretInputs, Settings, StackConfig  # noqa: E402
from lab.program import (  # noqa: E402
    Mocks,
    RecordingMonitor,
    Registration,
    generated_password,
    install_mocks,
    run,
    run_main,
)

__all__ = ["Mocks", "RecordingMonitor", "Registration", "generated_password", "run", "run_main"]

STACK = "test"
SECRET_SIG = rpc._special_sig_key  # "4dabf18193072939515e22adb298388d"
SECRET_MARK = rpc._special_secret_sig  # "1b47061264138c4ac30d75fd1eb44270"

# Distinctive secret values, so a leak is easy to spot in any serialized input.
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAAtestPRIVATEkeyMATERIALdoNotLeak0001\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
FAILOVER_TOKEN = "hcloudTokenForFailoverTests0123456789abcdefghijklmnopqrstuvwxyz01"


def ed25519_public_key(seed: int = 7, comment: str = "admin@example") -> str:
    """A syntactically valid OpenSSH ed25519 public key line."""
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes([seed]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


PUBLIC_KEY = ed25519_public_key()
ADMIN_CIDRS = ("198.51.100.7/32", "2001:db8::/64")


def make_settings(**overrides: Any) -> Settings:
    """A valid Settings; keyword arguments override single fields."""
    values: dict[str, Any] = {"ssh_public_key": PUBLIC_KEY, "admin_cidrs": ADMIN_CIDRS}
    values.update(overrides)
    return Settings(**values)


def make_stack(
    *,
    stats_password: str | None = None,
    vrrp_password: str | None = None,
    **overrides: Any,
) -> StackConfig:
    """A valid StackConfig; secrets are Pulumi secrets, passwords generated unless given."""
    return StackConfig(
        settings=make_settings(**overrides),
        secrets=SecretInputs(
            ssh_private_key=pulumi.Output.secret(PRIVATE_KEY),
            failover_token=pulumi.Output.secret(FAILOVER_TOKEN),
            stats_password=None if stats_password is None else pulumi.Output.secret(stats_password),
            vrrp_password=None if vrrp_password is None else pulumi.Output.secret(vrrp_password),
        ),
    )


SECRET_KEYS = (
    "sshPrivateKey",
    "failoverToken",
    "statsPassword",
    "vrrpPassword",
    "alertWebhookUrl",
    "token",
)


def valid_config(**overrides: Any) -> tuple[dict[str, str], list[str]]:
    """Raw stack config (as the CLI hands it to the program) and its secret keys.

    Keys are un-namespaced project keys or namespaced ones ("hcloud:token"); a value of
    None removes the key. Lists are JSON, as `pulumi config set --path` stores them.
    """
    import json

    raw: dict[str, Any] = {
        "sshPublicKey": PUBLIC_KEY,
        "adminCidrs": json.dumps(list(ADMIN_CIDRS)),
        "sshPrivateKey": PRIVATE_KEY,
        "failoverToken": FAILOVER_TOKEN,
    }
    raw.update(overrides)
    config: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            continue
        full = key if ":" in key else f"{PROJECT}:{key}"
        config[full] = value if isinstance(value, str) else json.dumps(value)
    secret_keys = [k for k in config if k.split(":", 1)[1] in SECRET_KEYS]
    return config, secret_keys


# --- mocks (shared with the local cloud tier: lab/program.py) ------------------------


@pytest.fixture
def monitor() -> Iterator[RecordingMonitor]:
    """Fresh mocks, a fresh root stack and empty config for each test."""
    mon = install_mocks(Mocks(), STACK)
    yield mon
    pulumi.runtime.set_all_config({}, [])


def resolve(output: Any) -> Any:
    """The value of an output after `run` has finished (all its futures are resolved)."""
    return _sync_await(pulumi.Output.from_input(output).future())


def is_secret(output: Any) -> bool:
    return bool(_sync_await(pulumi.Output.from_input(output).is_secret()))


def find_plaintext(wire: Any, needle: str, path: str = "") -> list[str]:
    """Paths in a serialized property struct where `needle` appears outside a secret,
    as it is or inside a base64 (optionally gzip) blob such as a file payload."""
    if isinstance(wire, dict):
        if wire.get(SECRET_SIG) == SECRET_MARK:
            return []
        hits: list[str] = []
        for key, value in wire.items():
            hits += find_plaintext(value, needle, f"{path}.{key}")
        return hits
    if isinstance(wire, list):
        hits = []
        for i, value in enumerate(wire):
            hits += find_plaintext(value, needle, f"{path}[{i}]")
        return hits
    if isinstance(wire, str) and (needle in wire or needle in _decoded(wire)):
        return [path or "."]
    return []


def _decoded(text: str) -> str:
    """`text` as base64 (gzip inside, e.g. a tar.gz payload on stdin) decoded, or ""."""
    if len(text) < 16:
        return ""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return ""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            return ""
    return raw.decode("latin-1")
