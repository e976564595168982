"""sshPublicKey/sshPrivateKey optional: without them the program generates an ED25519 pair
with pulumi-tls, keeps the private half secret, and uses and exports the pair."""

from __future__ import annotations

import pulumi

from components.cluster import TYPE_TOKEN
from lab.program import generated_ssh_key
from tests.conftest import (
    PRIVATE_KEY,
    PUBLIC_KEY,
    SECRET_MARK,
    SECRET_SIG,
    RecordingMonitor,
    is_secret,
    resolve,
    run_main,
    valid_config,
)

TLS_KEY = "tls:index/privateKey:PrivateKey"
SSH_KEY = "hcloud:index/sshKey:SshKey"
COMMAND = "command:remote:Command"


def main(monitor: RecordingMonitor, **overrides: str | None) -> dict[str, pulumi.Output]:
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    return run_main()


def test_without_a_key_pair_one_is_generated_used_and_exported(monitor: RecordingMonitor) -> None:
    exports = main(monitor, sshPublicKey=None, sshPrivateKey=None)
    (key,) = monitor.of_type(TLS_KEY)
    assert key.inputs == {"algorithm": "ED25519"}
    (component,) = monitor.of_type(TYPE_TOKEN)
    assert key.parent == component.urn
    public, private = generated_ssh_key(key.name)  # what the (mock) provider computed
    (ssh_key,) = monitor.of_type(SSH_KEY)
    assert ssh_key.inputs["publicKey"] == public
    steps = monitor.of_type(COMMAND)
    assert steps
    for step in steps:
        connection = step.wire["connection"]
        assert connection[SECRET_SIG] == SECRET_MARK
        assert connection["value"]["privateKey"] == private, step.name
    assert resolve(exports["ssh_public_key"]) == public
    assert not is_secret(exports["ssh_public_key"])
    assert is_secret(exports["ssh_private_key"])
    assert resolve(exports["ssh_private_key"]) == private


def test_a_configured_key_pair_is_used_and_nothing_is_generated(
    monitor: RecordingMonitor,
) -> None:
    exports = main(monitor)
    assert monitor.of_type(TLS_KEY) == []
    (ssh_key,) = monitor.of_type(SSH_KEY)
    assert ssh_key.inputs["publicKey"] == PUBLIC_KEY
    assert resolve(exports["ssh_public_key"]) == PUBLIC_KEY
    assert resolve(exports["ssh_private_key"]) == PRIVATE_KEY
    assert is_secret(exports["ssh_private_key"])
