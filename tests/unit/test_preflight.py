"""`make up` preflight: missing required config yields the exact `pulumi config set`
commands. Inputs are shaped as `pulumi config --json` prints them (project keys without
their namespace, secrets without a value)."""

from __future__ import annotations

import shlex

from ops.preflight import fixes

PLACEHOLDER = {"adminCidrs": {"value": '["203.0.113.10/32"]', "objectValue": ["203.0.113.10/32"],
                              "secret": False}}  # fmt: skip
TOKEN = {"hcloud:token": {"secret": True}}
CIDRS = {"adminCidrs": {"value": '["198.18.7.7/32"]', "objectValue": ["198.18.7.7/32"],
                        "secret": False}}  # fmt: skip


def commands(config: dict) -> list[str]:
    return [command for _, command in fixes(config, "dev")]


def test_an_empty_stack_gets_the_token_and_admin_cidr_commands() -> None:
    found = commands({})
    assert found == [
        "pulumi config set --path 'hcloud-ha-web:adminCidrs[0]' "
        '"$(curl -s https://ifconfig.me)/32" --stack dev',
        "pulumi config set --secret hcloud:token --stack dev",
    ]
    for command in found:
        shlex.split(command)  # a shell can parse it as printed


def test_the_dev_stack_placeholder_counts_as_missing() -> None:
    (what,) = [w for w, _ in fixes({**PLACEHOLDER, **TOKEN}, "dev")]
    assert "placeholder" in what


def test_a_complete_stack_needs_nothing_and_no_ssh_key_is_required() -> None:
    assert commands({**CIDRS, **TOKEN}) == []


def test_half_a_key_pair_asks_for_the_other_half() -> None:
    public = {"sshPublicKey": {"value": "ssh-ed25519 AAAA x", "secret": False}}
    private = {"sshPrivateKey": {"secret": True}}
    (fix,) = commands({**CIDRS, **TOKEN, **public})
    assert fix.startswith("pulumi config set --secret hcloud-ha-web:sshPrivateKey")
    (fix,) = commands({**CIDRS, **TOKEN, **private})
    assert fix.startswith("pulumi config set hcloud-ha-web:sshPublicKey")
    assert commands({**CIDRS, **TOKEN, **public, **private}) == []
