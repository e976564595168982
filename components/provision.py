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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_hcloud as hcloud
from pulumi_command import remote

from components.config import Settings, StackConfig
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
from components.site_steps import WebHost, site_steps

APT = "apt-get -q -o DPkg::Lock::Timeout=600"


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
if [ -n "$changed" ]; then
  export CHANGED="$changed"  # the activate command may look at which files changed
  {activate_command(daemon, layout)}
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


def _pick(host: str, index: int) -> Callable[[Mapping[str, tuple[StepPlan, ...]]], StepPlan]:
    return lambda plans: plans[host][index]


def provision_cluster(
    *,
    parent: pulumi.Resource,
    name: str,
    stack: StackConfig,
    servers: Mapping[str, hcloud.Server],
    floating_ip: hcloud.FloatingIp,
    stats_password: pulumi.Output[str],
    vrrp_password: pulumi.Output[str],
    depends_on: Sequence[pulumi.Resource],
    acme_account_seed: pulumi.Output[str] | None = None,
    alert_webhook_url: pulumi.Output[str] | None = None,
    ssh_private_key: pulumi.Output[str] | None = None,
) -> Mapping[str, Sequence[pulumi.Resource]]:
    """Create the remote steps of every server; returns them per server, in order.

    Steps on different hosts run in parallel, except that lb2 reloads a daemon only
    after lb1 has, so the two LBs never reload at the same moment. Steps are named
    f"{name}-{host}-{step}", next to the component's servers.
    """
    settings = stack.settings
    hosts = [*settings.lb_names, *settings.web_names]
    server_ids = pulumi.Output.all(*[servers[h].id for h in hosts]).apply(
        lambda ids: {h: int(i) for h, i in zip(hosts, ids, strict=True)}
    )
    plans: pulumi.Output[dict[str, tuple[StepPlan, ...]]] = pulumi.Output.all(
        floating_ip.ip_address,
        floating_ip.id,
        server_ids,
        stats_password,
        vrrp_password,
        stack.secrets.failover_token,
        acme_account_seed if acme_account_seed is not None else "",
        alert_webhook_url if alert_webhook_url is not None else "",
    ).apply(
        lambda v: {
            h: plan_host(
                settings,
                ClusterFacts(floating_ip=v[0], floating_ip_id=int(v[1]), server_ids=v[2]),
                RenderSecrets(
                    stats_password=v[3],
                    vrrp_password=v[4],
                    failover_token=v[5],
                    acme_account_seed=v[6],
                    alert_webhook_url=v[7].strip(),
                ),
                h,
            )
            for h in hosts
        }
    )

    # The stack's key: configured, or generated by the component (then not in the config).
    private_key = ssh_private_key if ssh_private_key is not None else stack.secrets.ssh_private_key
    steps: dict[str, list[pulumi.Resource]] = {}
    previous_lb_step: dict[str, pulumi.Resource] = {}
    for host in hosts:
        role: Role = "lb" if host in settings.lb_names else "web"
        connection = remote.ConnectionArgs(
            host=servers[host].ipv4_address,
            user="root",
            private_key=private_key,
            dial_error_limit=30,  # a new server needs a while before sshd answers
            per_dial_timeout=10,
        )
        script = base_script(role, settings)
        base = remote.Command(
            f"{name}-{host}-base",
            connection=connection,
            create=script,
            triggers=[hashlib.sha256(script.encode()).hexdigest()],
            add_previous_output_in_env=False,
            opts=pulumi.ResourceOptions(parent=parent, depends_on=[servers[host], *depends_on]),
        )
        steps[host] = [base]
        for index, daemon in enumerate(daemons_for(role)):
            plan = plans.apply(_pick(host, index))
            after: list[pulumi.Resource] = [steps[host][-1]]
            if role == "lb" and daemon.name in previous_lb_step:
                after.append(previous_lb_step[daemon.name])
            step = remote.Command(
                f"{name}-{host}-{daemon.name}",
                connection=connection,
                create=step_script(daemon, file_targets(settings, daemon)),
                stdin=_secret_stdin(plan),
                triggers=[plan.apply(lambda p: p.trigger)],
                add_previous_output_in_env=False,
                opts=pulumi.ResourceOptions(parent=parent, depends_on=after),
            )
            if role == "lb":
                previous_lb_step[daemon.name] = step
            steps[host].append(step)
    # The user's site: released after each web server's last daemon step, in waves.
    webs = {h: WebHost(servers[h], last=steps[h][-1]) for h in settings.web_names}
    added_steps = site_steps(
        parent=parent, name=name, stack=stack, webs=webs, private_key=private_key
    )
    for host, added in added_steps.items():
        steps[host] += added
    return steps
