"""Provisioning: per server, pulumi-command remote steps built from the render table.

Each host gets a `base` step (wait for cloud-init, install packages, record the
interface names) and then one step per daemon of its role (`components.render.DAEMONS`):
stage the files, check them with the daemon's own checker, move them into place and
reload, only if something changed. A rejected config leaves the running one untouched
and fails the step with the checker's output.

Files travel as a base64 tarball on stdin, so no secret is ever in the command text; the
stdin and the triggers derived from secret values are secret outputs. Each step's
`triggers` hash what it ships, so a template change re-runs only the steps it touches.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shlex
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_hcloud as hcloud
from pulumi_command import remote

from components.config import Settings, StackConfig
from components.day2 import (
    authorized_keys,
    drain_script,
    keys_script,
    lb_ready_script,
    undrain_script,
    web_ready_script,
)
from components.render import (
    PACKAGES,
    ClusterFacts,
    DaemonSpec,
    FileTarget,
    Layout,
    RenderedFile,
    RenderSecrets,
    Role,
    activate_command,
    daemons_for,
    file_targets,
    interface_facts_script,
    render_host,
    validate_command,
)
from components.rolling import lb_order, rolling_gates, web_waves
from components.site_steps import WebHost, site_steps

APT = "apt-get -q -o DPkg::Lock::Timeout=600"
#: Where a step notes the files whose activation has not succeeded yet.
PENDING_DIR = "/var/lib/hcloud-ha-web"


def base_script(role: Role, settings: Settings) -> str:
    """Shell of the base step: idempotent, safe to re-run."""
    extra = settings.web_packages if role == "web" else ()
    packages = " ".join((*PACKAGES[role], *extra))
    return f"""set -eu
if command -v cloud-init >/dev/null 2>&1; then
  cloud-init status --wait >/dev/null 2>&1 || true
fi
export DEBIAN_FRONTEND=noninteractive
{APT} update
{APT} install -y --no-install-recommends {packages}
{interface_facts_script(settings.subnet_cidr)}
echo "hcloud-ha-web: base ready ({packages})"
"""


#: Inside the staged tree (never installed): the secret values of this step, one a line.
MASK_FILE = ".hcloud-ha-web-mask"
MASK_TEXT = "[secret hidden]"
# A checker quotes the line it rejects, secrets included (HAProxy does); a step prints
# that output only after replacing every secret form listed in the staged mask file. The
# values travel on stdin with the files, never in the command text. perl-base is
# essential on Debian, so every host has it.
MASK_FUNCTION = (
    "mask() {\n"
    '  if [ -s "$stage/' + MASK_FILE + '" ]; then\n'
    '    perl -e \'open(my $f, "<", shift) or die;'
    ' my @m = grep { length } map { chomp; $_ } <$f>; local $/; my $t = <STDIN> // "";'
    " for my $m (@m) { $t =~ s/\\Q$m\\E/" + MASK_TEXT + "/g } print $t;'"
    ' "$stage/' + MASK_FILE + '"\n'
    "  else cat; fi\n"
    "}"
)


def step_script(
    daemon: DaemonSpec, targets: Sequence[FileTarget], layout: Layout | None = None
) -> str:
    """Shell of one daemon step. Reads the staged tree (tar.gz, base64) from stdin.

    Built from file targets only, so the command text holds no secret and shows in
    `pulumi preview` as it is.
    """
    installs = "\n".join(f"install_file {shlex.quote(t.path)} {t.mode} {t.owner}" for t in targets)
    root = (layout or Layout()).root.rstrip("/")
    pending = shlex.quote(f"{root}{PENDING_DIR}/pending-{daemon.name}")
    return f"""set -eu
umask 077
stage=$(mktemp -d /var/tmp/hcloud-ha-web-{daemon.name}.XXXXXX)
trap 'rm -rf "$stage"' EXIT
base64 -d | tar -xzf - -C "$stage" --no-same-owner
export STAGE="$stage"
{MASK_FUNCTION}
if ! out=$( ( {validate_command(daemon, layout)}
) 2>&1 ); then
  printf '%s\\n' "$out" | mask >&2
  echo "hcloud-ha-web: {daemon.name} config rejected on $(hostname); running config untouched" >&2
  exit 1
fi
changed=""
install_file() {{
  if ! cmp -s "$stage$1" "$1"; then
    # New directories are traversable (a docroot must be, for www-data); secrets are
    # protected by their files' own modes.
    (umask 022 && mkdir -p "$(dirname "$1")")
    install -m "$2" -o "${{3%%:*}}" -g "${{3##*:}}" "$stage$1" "$1.hcloud-ha-web-new"
    mv -f "$1.hcloud-ha-web-new" "$1"
    changed="$changed $1"
  fi
}}
{installs}
# Files installed by a run whose activation failed: activate them again, until it works.
pending={pending}
if [ -s "$pending" ]; then changed="$changed $(cat "$pending")"; fi
if [ -n "$changed" ]; then
  (umask 022 && mkdir -p "$(dirname "$pending")")
  printf '%s\n' "$changed" > "$pending"
  export CHANGED="$changed"  # the activate command may look at which files changed
  # Any failing command of the activation fails the step (set -e alone would let a
  # failure before the last `&&` pass) and leaves "$pending" for the next run.
  if ! ( {activate_command(daemon, layout)}
  ); then
    echo "hcloud-ha-web: {daemon.name} activation failed on $(hostname)" \
      "(it runs again on the next update)" >&2
    exit 1
  fi
  rm -f "$pending"
  echo "hcloud-ha-web: {daemon.name} updated and reloaded"
else
  echo "hcloud-ha-web: {daemon.name} unchanged"
fi
"""


def payload(files: Sequence[RenderedFile], masks: Sequence[str] = ()) -> str:
    """Deterministic tar.gz (base64) of the files at their destination paths, plus the
    mask file (the secret values a printed checker output must not show)."""
    buffer = io.BytesIO()
    entries = [(f.path.lstrip("/"), f.content, int(f.mode, 8)) for f in files]
    if masks:
        entries.append((MASK_FILE, "".join(f"{m}\n" for m in masks), 0o600))
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path, content, mode in sorted(entries):
            data = content.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    # gzip stores a timestamp of its own; zero it so equal files give equal payloads.
    raw = raw[:4] + b"\x00\x00\x00\x00" + raw[8:]
    return base64.b64encode(raw).decode()


def content_hash(files: Sequence[RenderedFile], script: str) -> str:
    digest = hashlib.sha256(script.encode())
    for f in sorted(files, key=lambda f: f.path):
        digest.update(f"\0{f.path}\0{f.mode}\0{f.owner}\0{f.sha256}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class StepPlan:
    """What one daemon step of one host ships: plain values, for tests and the lab."""

    host: str
    daemon: str
    script: str
    files: tuple[RenderedFile, ...]
    masks: tuple[str, ...] = field(default=(), repr=False)
    """The secret forms found in `files`: the step hides them in what it prints."""

    @property
    def stdin(self) -> str:
        return payload(self.files, self.masks)

    @property
    def trigger(self) -> str:
        return content_hash(self.files, self.script)


def plan_host(
    settings: Settings,
    facts: ClusterFacts,
    secrets: RenderSecrets,
    host: str,
    layout: Layout | None = None,
) -> tuple[StepPlan, ...]:
    """Every daemon step of `host`, in order (production paths unless `layout` says)."""
    files = render_host(settings, facts, secrets, host, layout)
    role: Role = "lb" if host in settings.lb_names else "web"
    plans = []
    for daemon in daemons_for(role):
        mine = tuple(f for f in files if f.daemon == daemon.name)
        script = step_script(daemon, file_targets(settings, daemon, layout), layout)
        masks = tuple(m for m in secrets.masks() if any(m in f.content for f in mine))
        plans.append(StepPlan(host, daemon.name, script, mine, masks))
    return tuple(plans)


def _secret_stdin(plan: pulumi.Output[StepPlan]) -> pulumi.Output[str]:
    stdin: pulumi.Output[str] = plan.apply(lambda p: p.stdin)
    return pulumi.Output.secret(stdin)


def _pick(index: int) -> Callable[[tuple[StepPlan, ...]], StepPlan]:
    return lambda plans: plans[index]


def _digest(values: Sequence[object]) -> str:
    return hashlib.sha256("\0".join(map(str, values)).encode()).hexdigest()


def _planner(settings: Settings, host: str) -> Callable[[list[Any]], tuple[StepPlan, ...]]:
    def plan(v: list[Any]) -> tuple[StepPlan, ...]:
        return plan_host(
            settings,
            ClusterFacts(
                floating_ip=v[0],
                floating_ip_id=int(v[1]),
                # Only this host's own id reaches its files (the failover script); the
                # others are never rendered for it.
                server_ids={
                    h: int(v[2]) if h == host else 0
                    for h in (*settings.lb_names, *settings.web_names)
                },
            ),
            RenderSecrets(
                stats_password=v[3],
                vrrp_password=v[4],
                failover_token=v[5],
                acme_account_seed=v[6],
                alert_webhook_url=v[7].strip(),
            ),
            host,
        )

    return plan


MakeServer = Callable[[str, Sequence[pulumi.Resource]], hcloud.Server]
"""(server name, readiness steps its turn waits for) -> the server resource."""


@dataclass
class HostSteps:
    """What provisioning registered for one server."""

    server: hcloud.Server
    steps: list[pulumi.Resource]
    """keys, base, one per daemon, serve: in order."""
    ready: list[pulumi.Resource]
    """The readiness steps that end this server's turn (an LB: one on itself; a web
    server: one on each LB)."""


def provision_cluster(
    *,
    parent: pulumi.Resource,
    name: str,
    stack: StackConfig,
    make_server: MakeServer,
    floating_ip: hcloud.FloatingIp,
    stats_password: pulumi.Output[str],
    vrrp_password: pulumi.Output[str],
    depends_on: Sequence[pulumi.Resource],
    rolling: bool,
    acme_account_seed: pulumi.Output[str] | None = None,
    alert_webhook_url: pulumi.Output[str] | None = None,
    ssh_private_key: pulumi.Output[str] | None = None,
    ssh_public_key: pulumi.Input[str] | None = None,
) -> dict[str, HostSteps]:
    """Create every server (through `make_server`) and its remote steps.

    Per server: `keys` (root's authorized_keys), `base`, one step per daemon, `serve`
    (takes the host into service; its `delete` drains it, so the engine hands the host
    over before the server is deleted, replaced or removed) and readiness steps. Every
    step's triggers include the server's id, so a new server always gets every step, and
    the engine's delete-before-replace cascade deletes (drains) them before the old
    server goes. Each host's files depend on its own server id only: replacing one
    server never touches another server's steps.

    `rolling` (a deployed cluster): a server's turn waits for the readiness steps of the
    previous turn (`components.rolling.rolling_gates`, passed to `make_server` to become
    the server's `depends_on`); the engine starts a resource's step only after its
    dependencies' steps finished, so the servers change one turn at a time. On a first
    deployment every server is created and provisioned in parallel, except that lb2
    reloads a daemon only after lb1 has.
    """
    settings = stack.settings
    gates = rolling_gates(settings.lb_names, settings.web_names, settings.web_max_unavailable)
    order = (
        [*lb_order(settings.lb_names), *settings.web_names]
        if rolling
        else [
            *settings.lb_names,
            *settings.web_names,
        ]
    )
    out: dict[str, HostSteps] = {}
    waves = web_waves(settings.web_names, settings.web_max_unavailable)
    site_switch: dict[str, pulumi.Resource] = {}
    last_lb_step: dict[str, pulumi.Resource] = {}
    haproxy_step: dict[str, pulumi.Resource] = {}
    # The stack's key pair: configured, or generated by the component (then not in the
    # config). root's authorized_keys always holds its public half, or provisioning
    # would lock itself out.
    private_key = ssh_private_key if ssh_private_key is not None else stack.secrets.ssh_private_key
    public_key = ssh_public_key if ssh_public_key is not None else settings.ssh_public_key
    keys = pulumi.Output.from_input(public_key).apply(lambda k: authorized_keys(settings, k))
    for host in order:
        role: Role = "lb" if host in settings.lb_names else "web"
        gate = [r for g in gates[host] for r in out[g].ready] if rolling else []
        server = make_server(host, gate)
        server_id = server.id
        plans: pulumi.Output[tuple[StepPlan, ...]] = pulumi.Output.all(
            floating_ip.ip_address,
            floating_ip.id,
            server_id,
            stats_password,
            vrrp_password,
            stack.secrets.failover_token,
            acme_account_seed if acme_account_seed is not None else "",
            alert_webhook_url if alert_webhook_url is not None else "",
        ).apply(_planner(settings, host))
        connection = remote.ConnectionArgs(
            host=server.ipv4_address,
            user="root",
            private_key=private_key,
            dial_error_limit=30,  # a new server needs a while before sshd answers
            per_dial_timeout=10,
        )

        def command(
            step: str,
            create: str,
            triggers: list[pulumi.Input[str]],
            after: Sequence[pulumi.Resource],
            *,
            stdin: pulumi.Input[str] | None = None,
            delete: str | None = None,
            on: remote.ConnectionArgs = connection,
            delete_before_replace: bool = False,
            host: str = host,
            server_id: pulumi.Output[str] = server_id,
        ) -> remote.Command:
            return remote.Command(
                f"{name}-{host}-{step}",
                connection=on,
                create=create,
                delete=delete,
                stdin=stdin,
                triggers=[server_id, *triggers],
                add_previous_output_in_env=False,
                opts=pulumi.ResourceOptions(
                    parent=parent,
                    depends_on=list(after),
                    delete_before_replace=delete_before_replace,
                ),
            )

        keys_step = command(
            "keys", keys_script(), [keys.apply(lambda k: _digest([keys_script(), k]))],
            [server, *depends_on],
            stdin=keys,
        )  # fmt: skip
        script = base_script(role, settings)
        base = command(
            "base", script, [hashlib.sha256(script.encode()).hexdigest()], [keys_step, *depends_on]
        )
        steps: list[pulumi.Resource] = [keys_step, base]
        triggers: list[pulumi.Output[str]] = []
        for index, daemon in enumerate(daemons_for(role)):
            plan = plans.apply(_pick(index))
            after: list[pulumi.Resource] = [steps[-1]]
            if role == "lb" and not rolling and daemon.name in last_lb_step:
                after.append(last_lb_step[daemon.name])
            trigger = plan.apply(lambda p: p.trigger)
            step = command(
                daemon.name,
                step_script(daemon, file_targets(settings, daemon)),
                [trigger],
                after,
                stdin=_secret_stdin(plan),
            )
            triggers.append(trigger)
            if role == "lb":
                last_lb_step[daemon.name] = step
                if daemon.name == "haproxy":
                    haproxy_step[host] = step
            steps.append(step)
        if role == "web":
            # The user's site, after the host's last daemon step; a wave of web servers
            # switches only after the wave before it switched (components/site_steps.py).
            wave = next(i for i, w in enumerate(waves) if host in w)
            previous = [site_switch[h] for h in waves[wave - 1]] if wave else []
            webs = {host: WebHost(server, last=steps[-1])}
            added = site_steps(
                parent=parent,
                name=name,
                stack=stack,
                webs=webs,
                previous=previous,
                private_key=private_key,
            )
            steps += added.get(host, [])
            site_switch[host] = steps[-1]
        # serve: in service once provisioned; its delete hands the host over first. It
        # is re-created (delete first: drain, then take back) when the server type
        # changes, after the resize (the server's before_update hook drained it).
        serve = command(
            "serve",
            undrain_script(role, settings),
            [settings.server_type],
            [steps[-1]],
            delete=drain_script(role, settings),
            delete_before_replace=True,
        )
        steps.append(serve)
        # Readiness re-runs whenever anything on the host changed.
        changed = pulumi.Output.all(settings.server_type, *triggers).apply(_digest)
        if role == "lb":
            ready: list[pulumi.Resource] = [command("ready", lb_ready_script(), [changed], [serve])]
        else:
            ready = [
                command(
                    f"ready-{lb}",
                    web_ready_script(host),
                    [changed, out[lb].server.id if lb in out else ""],
                    [serve, haproxy_step[lb]] if lb in haproxy_step else [serve],
                    on=remote.ConnectionArgs(
                        host=out[lb].server.ipv4_address,
                        user="root",
                        private_key=private_key,
                        dial_error_limit=30,
                        per_dial_timeout=10,
                    ),
                )
                for lb in settings.lb_names
            ]
        out[host] = HostSteps(server=server, steps=steps, ready=ready)
    return out
