"""The Pulumi program under Pulumi's mocks: what `pulumi up` would register, as plain values.

The unit tests and the local cloud tier both run the program this way:

* `Mocks` fills in what the providers compute (ids, addresses, generated passwords). By
  default it invents stable values; given `ProviderFacts` it answers with the lab's
  (server ids the fake Hetzner API knows, addresses the lab's hosts have, the lab's
  floating IP), so the program renders for the hosts that will run its steps.
* `RecordingMonitor` keeps every RegisterResource request exactly as the SDK sent it.
* `run_main` runs `__main__.py` with a stack config, as the CLI would.
* `remote_steps` turns the recorded `remote.Command`s into `RemoteStep`s: the command
  text, its stdin, its triggers, the server address it connects to and the steps it
  waits for. That is what the cloud tier executes over SSH, so it runs the very steps
  `pulumi up` would, never a copy.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import runpy
import string
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pulumi
from google.protobuf import json_format
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime.settings import get_root_resource, set_root_resource

from components import config as config_module
from components.config import PROJECT, StackConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND_TYPE = "command:remote:Command"
COPY_TYPE = "command:remote:CopyToRemote"
SERVER_TYPE = "hcloud:index/server:Server"
FLOATING_IP_TYPE = "hcloud:index/floatingIp:FloatingIp"
DYNAMIC_TYPE = "pulumi-python:dynamic:Resource"
GET_SERVERS_TOKEN = "hcloud:index/getServers:getServers"
TLS_PRIVATE_KEY_TYPE = "tls:index/privateKey:PrivateKey"

T = TypeVar("T")


@dataclass(frozen=True)
class ProviderFacts:
    """What Hetzner would answer for the servers and the floating IP, by resource name."""

    servers: Mapping[str, tuple[int, str]]
    """Server resource name (e.g. "hcloud-ha-web-lb1") -> (server id, IPv4 address)."""
    floating_ip: tuple[int, str]
    """(floating IP id, address)."""
    deployed: bool = False
    """Whether the cluster's servers exist already (what `hcloud.get_servers` finds):
    a deployed cluster changes in rolling turns."""


class Mocks(pulumi.runtime.Mocks):
    """Fills in what providers compute: numeric ids, addresses, generated passwords."""

    def __init__(
        self,
        facts: ProviderFacts | None = None,
        command_stdout: Callable[[str, Mapping[str, Any]], str | None] | None = None,
    ) -> None:
        self.facts = facts
        # What a remote.Command prints, when a later input depends on it (the site check
        # decides what the copy ships): given, the lab answers from the real host.
        self.command_stdout = command_stdout
        self._ids = itertools.count(1001)
        self._hosts = itertools.count(10)
        # Same logical name, same id and address: a program run twice sees equal facts.
        self._by_name: dict[tuple[str, str], tuple[str, int]] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        outputs = dict(args.inputs)
        key = (args.typ, args.name)
        if key not in self._by_name:
            # Ids from the name, not the registration order (which varies between runs):
            # two runs of the program must see equal ids to diff as the engine would.
            digest = int(hashlib.sha256(f"{args.typ}::{args.name}".encode()).hexdigest(), 16)
            rid = str(1001 + digest % 10**9)
            self._by_name[key] = (rid, next(self._hosts))
        rid, host = self._by_name[key]
        if args.typ == SERVER_TYPE:
            outputs["ipv4Address"] = f"203.0.113.{host}"
            outputs["ipv6Address"] = f"2001:db8:{host:x}::1"
            outputs["status"] = "running"
            if self.facts is not None:
                if args.name not in self.facts.servers:
                    raise KeyError(f"no provider facts for server {args.name!r}")
                server_id, address = self.facts.servers[args.name]
                rid, outputs["ipv4Address"] = str(server_id), address
        elif args.typ == FLOATING_IP_TYPE:
            outputs["ipAddress"] = "192.0.2.44"
            if self.facts is not None:
                rid, outputs["ipAddress"] = (
                    str(self.facts.floating_ip[0]),
                    self.facts.floating_ip[1],
                )
        elif args.typ == "hcloud:index/networkSubnet:NetworkSubnet":
            # The provider's subnet id is "<network id>-<ip range>".
            rid = f"{args.inputs['networkId']}-{args.inputs['ipRange']}"
        elif args.typ == TLS_PRIVATE_KEY_TYPE:
            public, private = generated_ssh_key(args.name)
            outputs["publicKeyOpenssh"] = public + "\n"  # the provider ends it with a newline
            outputs["privateKeyOpenssh"] = private
        elif args.typ == COMMAND_TYPE and self.command_stdout is not None:
            stdout = self.command_stdout(args.name, args.inputs)
            if stdout is not None:
                outputs["stdout"] = stdout
        elif args.typ == "random:index/randomPassword:RandomPassword":
            outputs["result"] = generated_password(
                args.name, int(args.inputs["length"]), bool(args.inputs.get("special", True))
            )
        elif args.typ == "random:index/randomBytes:RandomBytes":
            # What the provider computes: random bytes, here derived from the name.
            raw = hashlib.sha256(args.name.encode()).digest()[: int(args.inputs["length"])]
            outputs["base64"] = base64.b64encode(raw).decode()
            outputs["hex"] = raw.hex()
        return rid, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict, list | None]:
        if args.token == GET_SERVERS_TOKEN:
            servers = []
            if self.facts is not None and self.facts.deployed:
                servers = [
                    {"id": server_id, "name": name, "ipv4Address": address}
                    for name, (server_id, address) in self.facts.servers.items()
                ]
            return {"servers": servers, "withSelector": args.args.get("withSelector")}, []
        return {}, []


def generated_ssh_key(name: str) -> tuple[str, str]:
    """A deterministic ED25519-shaped OpenSSH pair standing in for pulumi-tls's."""
    seed = bytes((sum(map(ord, name)) + i) % 256 for i in range(32))
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + seed
    private = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        + base64.b64encode(b"generated:" + seed).decode()
        + "\n-----END OPENSSH PRIVATE KEY-----\n"
    )
    return f"ssh-ed25519 {base64.b64encode(blob).decode()}", private


def generated_password(name: str, length: int, special: bool) -> str:
    alphabet = string.ascii_letters + string.digits + ("!#%&*+-=?@^_" if special else "")
    seed = sum(map(ord, name))
    return "".join(alphabet[(seed + 7 * i) % len(alphabet)] for i in range(length))


@dataclass
class Registration:
    """One RegisterResource request as the engine would receive it."""

    type: str
    name: str
    urn: str
    parent: str
    custom: bool
    dependencies: list[str]
    ignore_changes: list[str]
    inputs: dict[str, Any]  # deserialized (secrets unwrapped)
    wire: dict[str, Any]  # serialized, secret values still wrapped
    id: str = ""
    state: dict[str, Any] = field(default_factory=dict)  # what the mocked provider returned
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)
    """Input name -> URNs its value came from (what the engine's replacement cascade reads)."""
    delete_before_replace: bool = False
    hooks: dict[str, list[str]] = field(default_factory=dict)
    """Hook kind ("before_update", ...) -> names of the resource hooks bound to it."""


class RecordingMonitor(pulumi_mocks.MockMonitor):
    """Pulumi's MockMonitor, keeping every request it receives."""

    registrations: list[Registration]
    outputs: dict[str, dict[str, Any]]

    def __init__(self, mocks: Mocks) -> None:
        super().__init__(mocks)
        self.registrations = []
        self.outputs = {}

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)  # type: ignore[no-untyped-call]
        if request.type != "pulumi:pulumi:Stack":
            self.registrations.append(
                Registration(
                    type=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent,
                    custom=request.custom,
                    dependencies=list(request.dependencies),
                    ignore_changes=list(request.ignoreChanges),
                    inputs=rpc.deserialize_properties(request.object),
                    wire=json_format.MessageToDict(request.object),
                    id=response.id,
                    state=rpc.deserialize_properties(response.object),
                    property_dependencies={
                        k: list(v.urns) for k, v in request.propertyDependencies.items()
                    },
                    delete_before_replace=bool(request.deleteBeforeReplace),
                    hooks=_hooks(request),
                )
            )
        return response

    def RegisterResourceOutputs(self, request: Any) -> Any:
        self.outputs[request.urn] = json_format.MessageToDict(request.outputs)
        return super().RegisterResourceOutputs(request)  # type: ignore[no-untyped-call]

    # --- queries ---------------------------------------------------------------------

    def of_type(self, type_: str) -> list[Registration]:
        return [r for r in self.registrations if r.type == type_]

    def named(self, name: str) -> Registration:
        found = [r for r in self.registrations if r.name == name]
        assert len(found) == 1, f"expected one resource named {name!r}, found {len(found)}"
        return found[0]

    def by_urn(self, urn: str) -> Registration:
        return next(r for r in self.registrations if r.urn == urn)


def _hooks(request: Any) -> dict[str, list[str]]:
    if not request.HasField("hooks"):
        return {}
    return {
        kind: list(getattr(request.hooks, kind))
        for kind in ("before_create", "before_update", "before_delete")
        if list(getattr(request.hooks, kind))
    }


def install_mocks(
    mocks: Mocks,
    stack: str,
    config: Mapping[str, str] | None = None,
    secret_keys: list[str] | None = None,
) -> RecordingMonitor:
    """Fresh mocks, a fresh root stack and the given config (project keys namespaced)."""
    monitor = RecordingMonitor(mocks)
    set_root_resource(None)  # type: ignore[arg-type]
    pulumi.runtime.set_all_config(dict(config or {}), list(secret_keys or []))
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    return monitor


def run(program: Callable[[], T]) -> T:
    """Run `program` under the installed mocks; wait until every registration has finished."""
    box: list[T] = []

    @pulumi.runtime.test  # type: ignore[untyped-decorator]
    def _program() -> None:
        box.append(program())

    _program()
    return box[0]


def run_main() -> dict[str, Any]:
    """Run __main__.py as the CLI would; returns the stack's exports."""
    run(lambda: runpy.run_path(str(REPO_ROOT / "__main__.py"), run_name="__main__"))
    root = get_root_resource()
    assert root is not None
    return dict(root.outputs)  # type: ignore[attr-defined]


# --- the remote steps ------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteStep:
    """One `remote.Command` as registered: what runs where, fed what, after what."""

    name: str
    host: str
    """`connection.host`: the server address the step connects to."""
    user: str
    create: str
    stdin: str = field(repr=False)
    triggers: tuple[str, ...] = field(repr=False)
    after: tuple[str, ...]
    """Names of the steps this one waits for (its dependencies that are steps)."""
    source: str = ""
    """A `remote.CopyToRemote`: the local path of its FileArchive (else "")."""
    remote_path: str = ""
    """A `remote.CopyToRemote`: where the archive's content lands on the host."""

    @property
    def is_copy(self) -> bool:
        return bool(self.source)

    @property
    def inputs(self) -> tuple[str, ...]:
        """What the engine diffs: a step re-runs on `pulumi up` when any of these changed.
        (The engine hashes an archive's content; a copy's triggers carry that hash here.)"""
        return (
            self.host,
            self.user,
            self.create,
            self.stdin,
            *self.triggers,
            self.source,
            self.remote_path,
        )


def reveal(value: Any) -> Any:
    """``value`` with every secret wrapper (as the engine receives it) replaced by its value."""
    if isinstance(value, dict):
        if value.get(rpc._special_sig_key) == rpc._special_secret_sig:
            return reveal(value["value"])
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def remote_steps(monitor: RecordingMonitor) -> dict[str, RemoteStep]:
    """Every recorded remote step (commands and copies) by name, in registration order."""
    commands = [r for r in monitor.registrations if r.type in (COMMAND_TYPE, COPY_TYPE)]
    names = {c.urn: c.name for c in commands}
    steps: dict[str, RemoteStep] = {}
    for command in commands:
        c = replace(command, inputs=reveal(command.inputs))
        connection = c.inputs["connection"]
        source = c.inputs.get("source")
        steps[c.name] = RemoteStep(
            name=c.name,
            host=str(connection["host"]),
            user=str(connection.get("user", "root")),
            create=str(c.inputs.get("create", "")),
            stdin=str(c.inputs.get("stdin", "")),
            triggers=tuple(str(t) for t in c.inputs.get("triggers", [])),
            after=tuple(sorted(names[d] for d in c.dependencies if d in names)),
            source=str(source.path) if isinstance(source, pulumi.FileArchive) else "",
            remote_path=str(c.inputs.get("remotePath", "")),
        )
        if c.type == COPY_TYPE and not steps[c.name].source:
            raise TypeError(f"{c.name}: the lab replays FileArchive sources only, not {source!r}")
    return steps


_load_settings = config_module.load_settings


def _lab_load_settings(config: pulumi.Config | None = None) -> StackConfig:
    return _load_settings(config, lab=True)


def program_steps(
    config: Mapping[str, str],
    secret_keys: list[str],
    facts: ProviderFacts,
    stack: str = "lab",
    *,
    lab: bool = False,
    command_stdout: Callable[[str, Mapping[str, Any]], str | None] | None = None,
) -> dict[str, RemoteStep]:
    """Run the program (`__main__.py`) with `config` under mocks answering `facts`;
    the remote steps it registers.

    `lab=True` is the lab-only settings path: `load_settings(lab=True)` accepts the fake
    API's http URL and the lab's 198.18.0.0/15 addresses, which stack config alone
    never can (see components.config.Settings.lab). `command_stdout` answers a
    command's stdout, as the engine would after running it (see `Mocks`).
    """
    return remote_steps(_recorded(config, secret_keys, facts, stack, lab, command_stdout))


def _recorded(
    config: Mapping[str, str],
    secret_keys: list[str],
    facts: ProviderFacts,
    stack: str,
    lab: bool,
    command_stdout: Callable[[str, Mapping[str, Any]], str | None] | None,
) -> RecordingMonitor:
    monitor = install_mocks(Mocks(facts, command_stdout), stack, config, secret_keys)
    try:
        if lab:
            with mock.patch.object(config_module, "load_settings", _lab_load_settings):
                run_main()
        else:
            run_main()
    finally:
        pulumi.runtime.set_all_config({}, [])
    return monitor


# --- every resource, for replaying an update in the engine's order (lab.cloud.apply) -----


@dataclass(frozen=True)
class PlannedResource:
    """One custom resource as registered: what the engine diffs and how it orders steps."""

    name: str
    type: str
    inputs: Mapping[str, Any] = field(repr=False)
    """Inputs with secrets revealed (the engine diffs these)."""
    after: tuple[str, ...]
    """Names of the resources it depends on (explicitly or through its inputs)."""
    sources: Mapping[str, tuple[str, ...]] = field(repr=False)
    """Input name -> names of the resources its value came from."""
    delete_before_replace: bool = False
    ignore_changes: tuple[str, ...] = ()
    hooks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """What the (mocked) provider returned: the state a hook sees as old outputs."""


def planned_resources(monitor: RecordingMonitor) -> dict[str, PlannedResource]:
    """Every recorded custom resource by name, in registration order."""
    custom = [r for r in monitor.registrations if r.custom]
    names = {r.urn: r.name for r in custom}
    out: dict[str, PlannedResource] = {}
    for r in custom:
        out[r.name] = PlannedResource(
            name=r.name,
            type=r.type,
            inputs=reveal(r.inputs),
            after=tuple(names[d] for d in r.dependencies if d in names),
            sources={
                k: tuple(names[u] for u in urns if u in names)
                for k, urns in r.property_dependencies.items()
            },
            delete_before_replace=r.delete_before_replace,
            ignore_changes=tuple(r.ignore_changes),
            hooks={k: tuple(v) for k, v in r.hooks.items()},
            outputs=reveal(r.state),
        )
    return out


def program_plan(
    config: Mapping[str, str],
    secret_keys: list[str],
    facts: ProviderFacts,
    stack: str = "lab",
    *,
    lab: bool = False,
    command_stdout: Callable[[str, Mapping[str, Any]], str | None] | None = None,
) -> tuple[dict[str, RemoteStep], dict[str, PlannedResource]]:
    """As `program_steps`; also every resource the program registers."""
    monitor = _recorded(config, secret_keys, facts, stack, lab, command_stdout)
    return remote_steps(monitor), planned_resources(monitor)
