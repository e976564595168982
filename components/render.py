"""Rendering: every file a host gets, from plain values, through one Jinja2 environment.

`DAEMONS` is the one table that says, per role, which files exist (template, destination,
mode, owner), how a staged copy is validated and how it is activated. The component,
the tests and the lab all render through `render_host()`; the lab only changes the
`Layout` (a path prefix and log targets), never the rendered text.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2

from components.acme_account import AccountKey, account_key_from_b64
from components.config import Settings

Role = Literal["lb", "web"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
HEALTH_PORT = 8405  # HAProxy's local health endpoint, checked by keepalived
PRIMARY_PRIORITY = 150
BACKUP_PRIORITY = 100
# Seconds between the master's API ownership checks: 720 GETs/hour at most, within the
# project's 3600 requests/hour.
OWNERSHIP_CHECK_INTERVAL = 5
FAILOVER_SCRIPT = "/usr/local/sbin/hcloud-floating-ip"
TOKEN_FILE = "/etc/hcloud-ha-web/failover-token"
DOCROOT = "/var/www/hcloud-ha-web"
# --- HTTPS (issue 11): certificate paths and the ACME client (dehydrated) ---------------
TLS_CERT = "/etc/haproxy/certs/site.pem"
"""Certificate + key HAProxy serves (0600); a placeholder until the first issuance."""
ACME_CONF_DIR = "/etc/hcloud-ha-web/acme"
ACME_STATE_DIR = "/var/lib/hcloud-ha-web/acme"
CERT_STATE_FILE = "/var/lib/hcloud-ha-web/cert-state.json"
CERT_SCRIPT = "/usr/local/sbin/hcloud-ha-web-cert"
EVENT_HOOK = "/usr/local/sbin/hcloud-ha-web-event"
ACME_RENEW_DAYS = 30
STATS_LOCAL_PORT = 8404
PLACEHOLDER_SUBJECT = "/O=hcloud-ha-web/CN=placeholder until the ACME certificate is issued"

PACKAGES: Mapping[Role, tuple[str, ...]] = {
    "lb": ("haproxy", "keepalived", "curl", "python3", "iproute2", "openssl", "dehydrated"),
    "web": ("apache2", "curl", "iproute2"),
}

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,  # HAProxy rejects a config without a final newline
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)


@dataclass(frozen=True)
class FileSpec:
    template: str
    dest: str
    mode: str = "0644"
    owner: str = "root:root"


@dataclass(frozen=True)
class DaemonSpec:
    """One remote step per host: files shipped together, checked, then activated.

    `validate` and `activate` are shell; `{root}` is the host's path prefix and the
    validate command finds the staged files under "$STAGE{root}". `activate` runs only
    when a file changed, with the changed paths in "$CHANGED" (space separated).
    """

    name: str
    role: Role
    files: tuple[FileSpec, ...]
    validate: str
    activate: str


_APACHE_VALIDATE = r"""
base={root}/etc/apache2; [ -d "$base" ] || base=/etc/apache2
cfg=$(mktemp -d); trap 'rm -rf "$cfg"' EXIT
cp -a "$base/." "$cfg/" && cp -a "$STAGE{root}/etc/apache2/." "$cfg/"
for m in remoteip usertrack; do ln -sf ../mods-available/$m.load "$cfg/mods-enabled/$m.load"; done
ln -sf ../sites-available/hcloud-ha-web.conf "$cfg/sites-enabled/hcloud-ha-web.conf"
rm -f "$cfg/sites-enabled/000-default.conf"
# envvars reads variables it may not find set: source it without the step's `set -u`
(set +u && . /etc/apache2/envvars && export APACHE_RUN_DIR="$cfg/run" \
  && mkdir -p "$APACHE_RUN_DIR" && apache2 -t -d "$cfg" -f "$cfg/apache2.conf")
"""

# HAProxy refuses a config whose `crt` file is missing: before the first issuance a
# self-signed placeholder (ECDSA P-256, made here on the host, never shipped) lets it start.
_PLACEHOLDER = rf"""
cert={{root}}{TLS_CERT}
if grep -q ' ssl crt ' "$STAGE{{root}}/etc/haproxy/haproxy.cfg" && [ ! -s "$cert" ]; then
  (umask 077 && mkdir -p "$(dirname "$cert")" && tmp=$(mktemp -d) \
    && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -days 90 \
       -subj '{PLACEHOLDER_SUBJECT}' -keyout "$tmp/key" -out "$tmp/crt" 2>/dev/null \
    && cat "$tmp/crt" "$tmp/key" > "$cert.new" && mv -f "$cert.new" "$cert"; rm -rf "$tmp")
fi
"""

DAEMONS: tuple[DaemonSpec, ...] = (
    DaemonSpec(
        name="apache",
        role="web",
        files=(
            FileSpec("apache2/ports.conf.j2", "/etc/apache2/ports.conf"),
            FileSpec(
                "apache2/hcloud-ha-web.conf.j2",
                "/etc/apache2/sites-available/hcloud-ha-web.conf",
            ),
            FileSpec("www/index.html.j2", f"{DOCROOT}/index.html"),
            FileSpec("www/check.txt.j2", f"{DOCROOT}{{health_check_path}}"),
        ),
        validate=_APACHE_VALIDATE,
        activate=(
            "a2enmod -q remoteip usertrack && a2ensite -q hcloud-ha-web"
            " && { a2dissite -q 000-default 2>/dev/null || true; }"
            " && systemctl enable -q apache2"
            # A graceful restart keeps the old listening sockets: it cannot move a Listen to
            # another address (the first run replaces Debian's `Listen 80`). Restart then.
            ' && case " $CHANGED " in *" {root}/etc/apache2/ports.conf "*)'
            " systemctl restart apache2 ;; *) systemctl reload-or-restart apache2 ;; esac"
        ),
    ),
    DaemonSpec(
        name="network",
        role="lb",
        files=(
            FileSpec(
                "network/60-hcloud-ha-web.conf.j2",
                "/etc/sysctl.d/60-hcloud-ha-web.conf",
            ),
            FileSpec(
                "network/hcloud-floating-ip.service.j2",
                "/etc/systemd/system/hcloud-floating-ip.service",
            ),
        ),
        validate=(
            "grep -Eq '^net\\.ipv4\\.ip_nonlocal_bind = 1$'"
            " $STAGE{root}/etc/sysctl.d/60-hcloud-ha-web.conf"
            " && grep -q '^ExecStart=/usr/sbin/ip ' "
            "$STAGE{root}/etc/systemd/system/hcloud-floating-ip.service"
        ),
        activate=(
            "sysctl -q -p /etc/sysctl.d/60-hcloud-ha-web.conf && systemctl daemon-reload"
            " && systemctl enable -q hcloud-floating-ip.service"
            " && systemctl restart hcloud-floating-ip.service"
        ),
    ),
    DaemonSpec(
        name="haproxy",
        role="lb",
        files=(FileSpec("haproxy/haproxy.cfg.j2", "/etc/haproxy/haproxy.cfg", "0600"),),
        validate=_PLACEHOLDER + "haproxy -c -f $STAGE{root}/etc/haproxy/haproxy.cfg",
        activate="systemctl enable -q haproxy && systemctl reload-or-restart haproxy",
    ),
    DaemonSpec(
        # After haproxy: HAProxy already answers the http-01 challenges when the first
        # issuance runs. Without domains the same files switch the renewal timer off.
        name="acme",
        role="lb",
        files=(
            FileSpec("acme/dehydrated.conf.j2", f"{ACME_CONF_DIR}/dehydrated.conf"),
            FileSpec("acme/domains.txt.j2", f"{ACME_CONF_DIR}/domains.txt"),
            FileSpec("acme/account_key.pem.j2", f"{ACME_CONF_DIR}/account_key.pem", "0600"),
            FileSpec("acme/hcloud-ha-web-cert.j2", CERT_SCRIPT, "0755"),
            FileSpec(
                "acme/hcloud-ha-web-cert.service.j2",
                "/etc/systemd/system/hcloud-ha-web-cert.service",
            ),
            FileSpec(
                "acme/hcloud-ha-web-cert.timer.j2", "/etc/systemd/system/hcloud-ha-web-cert.timer"
            ),
        ),
        validate=(
            f"python3 -m py_compile $STAGE{{root}}{CERT_SCRIPT} && rm -rf $STAGE{{root}}"
            f"{Path(CERT_SCRIPT).parent}/__pycache__"
            f" && bash -n $STAGE{{root}}{ACME_CONF_DIR}/dehydrated.conf"
            f" && python3 $STAGE{{root}}{CERT_SCRIPT} check-config"
        ),
        # Bounded: the first issuance waits at most ~2 minutes, then says what is pending.
        activate=f"{{root}}{CERT_SCRIPT} activate",
    ),
    DaemonSpec(
        name="failover",
        role="lb",
        files=(
            FileSpec("keepalived/hcloud-floating-ip.j2", FAILOVER_SCRIPT, "0755"),
            FileSpec("keepalived/failover-token.j2", TOKEN_FILE, "0600"),
        ),
        validate=(
            f"python3 -m py_compile $STAGE{{root}}{FAILOVER_SCRIPT} && rm -rf $STAGE{{root}}"
            f"{Path(FAILOVER_SCRIPT).parent}/__pycache__"
        ),
        # keepalived runs the script at its next transition or check; nothing to reload.
        activate="true",
    ),
    DaemonSpec(
        name="keepalived",
        role="lb",
        files=(
            FileSpec("keepalived/keepalived.conf.j2", "/etc/keepalived/keepalived.conf", "0600"),
        ),
        # keepalived -t also checks that the scripts it runs exist: the failover step
        # before this one has installed them.
        validate="keepalived -t -f $STAGE{root}/etc/keepalived/keepalived.conf",
        activate="systemctl enable -q keepalived && systemctl reload-or-restart keepalived",
    ),
)


def daemons_for(role: Role) -> tuple[DaemonSpec, ...]:
    return tuple(d for d in DAEMONS if d.role == role)


@dataclass(frozen=True)
class Host:
    name: str
    role: Role
    private_ip: str
    server_id: int


@dataclass(frozen=True)
class ClusterFacts:
    """What only Hetzner knows: ids and the floating IP, resolved before rendering."""

    floating_ip: str
    floating_ip_id: int
    server_ids: Mapping[str, int]


@dataclass(frozen=True)
class RenderSecrets:
    stats_password: str = field(repr=False)
    vrrp_password: str = field(repr=False)
    failover_token: str = field(repr=False)
    acme_account_seed: str = field(default="", repr=False)
    """Base64 seed of the shared ACME account key (components/acme_account.py)."""


@dataclass(frozen=True)
class Layout:
    """Where a host's files live. Production uses the defaults; the lab sets a prefix."""

    root: str = ""
    """Prefix of every path the files name (the lab gives each host its own tree)."""
    haproxy_log_target: str = "/dev/log"
    """HAProxy `log` target: the journal via /dev/log, or `stdout` in the lab."""
    failover_log_file: str = ""
    """Empty: the failover script logs to the journal; else it appends to this file."""
    acme_ca_bundle: str = ""
    """Lab only: the CA file the ACME client trusts for the ACME server (Pebble's API)."""
    haproxy_reload_command: str = "systemctl reload haproxy"
    """How the cert script reloads HAProxy if the runtime API refuses a new certificate."""
    systemd: bool = True
    """False in the lab: the cert script's `activate` then leaves units alone."""


@dataclass(frozen=True)
class RenderedFile:
    daemon: str
    path: str
    content: str = field(repr=False)
    mode: str
    owner: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


def hosts(settings: Settings, facts: ClusterFacts) -> tuple[Host, ...]:
    lbs = tuple(
        Host(name, "lb", ip, facts.server_ids[name])
        for name, ip in zip(settings.lb_names, settings.lb_ips, strict=True)
    )
    webs = tuple(
        Host(name, "web", ip, facts.server_ids[name])
        for name, ip in zip(settings.web_names, settings.web_ips, strict=True)
    )
    return lbs + webs


def host_variables(
    settings: Settings,
    facts: ClusterFacts,
    secrets: RenderSecrets,
    host: Host,
    layout: Layout,
) -> dict[str, Any]:
    """The explicit variable map every template of `host` is rendered with."""
    all_hosts = hosts(settings, facts)
    lbs = [h for h in all_hosts if h.role == "lb"]
    is_primary = host.role == "lb" and host.name == lbs[0].name
    peer = next((h for h in lbs if h.name != host.name), lbs[0])
    root = layout.root.rstrip("/")
    return {
        "root": root,
        "host": host,
        "peer": peer,
        "lbs": lbs,
        "webs": [h for h in all_hosts if h.role == "web"],
        "cluster_name": settings.cluster_name,
        "subnet_cidr": settings.subnet_cidr,
        "floating_ip": facts.floating_ip,
        "floating_ip_id": facts.floating_ip_id,
        "api_endpoint": settings.hetzner_api_endpoint,
        "balance": settings.balance,
        "cookie_name": settings.cookie_name,
        "cookie_mode": settings.cookie_mode,
        "health_check_path": settings.health_check_path,
        "health_check_path_regex": re.escape(settings.health_check_path),
        "health_check_host": settings.cluster_name,
        "health_port": HEALTH_PORT,
        "check_interval_ms": settings.haproxy_check_interval_ms,
        "check_fall": settings.haproxy_check_fall,
        "check_rise": settings.haproxy_check_rise,
        "stats_user": settings.stats_user,
        "stats_password": secrets.stats_password,
        "vrrp_password": secrets.vrrp_password,
        "failover_token": secrets.failover_token,
        "vrrp_router_id": settings.vrrp_router_id,
        "vrrp_version": settings.vrrp_version,
        "vrrp_advert_interval": _seconds(settings.vrrp_advert_interval),
        "is_primary": is_primary,
        "priority": PRIMARY_PRIORITY if is_primary else BACKUP_PRIORITY,
        "ownership_check_interval": OWNERSHIP_CHECK_INTERVAL,
        "failover_script": root + FAILOVER_SCRIPT,
        "token_file": root + TOKEN_FILE,
        "pid_file": root + "/run/hcloud-floating-ip.pid",
        "log_file": layout.failover_log_file,
        "haproxy_log_target": layout.haproxy_log_target,
        "docroot": root + DOCROOT,
        **_https_variables(settings, secrets, layout, root),
    }


def _https_variables(
    settings: Settings, secrets: RenderSecrets, layout: Layout, root: str
) -> dict[str, Any]:
    account = _account_key(secrets.acme_account_seed) if settings.domains else None
    return {
        "domains": list(settings.domains),
        "acme_email": settings.acme_email,
        "acme_directory": settings.acme_directory,
        "acme_thumbprint": account.thumbprint if account else "",
        "acme_account_key_pem": account.private_pem if account else "",
        "acme_renew_days": ACME_RENEW_DAYS,
        "acme_conf_dir": root + ACME_CONF_DIR,
        "acme_state_dir": root + ACME_STATE_DIR,
        "acme_curl_opts": f"--cacert {layout.acme_ca_bundle}" if layout.acme_ca_bundle else "",
        "cert_script": root + CERT_SCRIPT,
        "cert_state_file": root + CERT_STATE_FILE,
        "event_hook": root + EVENT_HOOK,
        "haproxy_socket": root + "/run/haproxy/admin.sock",
        "haproxy_reload_command": layout.haproxy_reload_command,
        "systemd": layout.systemd,
        "tls_cert": root + TLS_CERT,
        "hsts_max_age": settings.hsts_max_age,
        "admin_cidrs": list(settings.admin_cidrs),
        "stats_local_port": STATS_LOCAL_PORT,
    }


@functools.lru_cache(maxsize=8)
def _account_key(seed_b64: str) -> AccountKey:
    if not seed_b64:
        raise ValueError("domains are set but no ACME account key seed was given")
    return account_key_from_b64(seed_b64)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def render_host(
    settings: Settings,
    facts: ClusterFacts,
    secrets: RenderSecrets,
    host_name: str,
    layout: Layout | None = None,
) -> tuple[RenderedFile, ...]:
    """Render every file of one host, in table order."""
    layout = layout or Layout()
    host = next((h for h in hosts(settings, facts) if h.name == host_name), None)
    if host is None:
        raise KeyError(f"no host named {host_name!r} in this cluster")
    variables = host_variables(settings, facts, secrets, host, layout)
    rendered = []
    for daemon in daemons_for(host.role):
        for spec in daemon.files:
            dest = spec.dest.replace("{health_check_path}", settings.health_check_path)
            content = _ENV.get_template(spec.template).render(**variables)
            rendered.append(
                RenderedFile(
                    daemon.name,
                    variables["root"] + dest,
                    content,
                    spec.mode,
                    spec.owner,
                )
            )
    return tuple(rendered)


@dataclass(frozen=True)
class FileTarget:
    """Where one file of a daemon goes, known without rendering (no secrets needed)."""

    path: str
    mode: str
    owner: str


def file_targets(
    settings: Settings, daemon: DaemonSpec, layout: Layout | None = None
) -> tuple[FileTarget, ...]:
    root = (layout or Layout()).root.rstrip("/")
    return tuple(
        FileTarget(
            root + spec.dest.replace("{health_check_path}", settings.health_check_path),
            spec.mode,
            spec.owner,
        )
        for spec in daemon.files
    )


def validate_command(daemon: DaemonSpec, layout: Layout | None = None) -> str:
    return daemon.validate.replace("{root}", (layout or Layout()).root.rstrip("/")).strip()


def activate_command(daemon: DaemonSpec, layout: Layout | None = None) -> str:
    return daemon.activate.replace("{root}", (layout or Layout()).root.rstrip("/")).strip()


def interface_facts_script(subnet_cidr: str, layout: Layout | None = None) -> str:
    """Shell that discovers this host's interfaces and records them for the daemons.

    The private interface's name depends on the server type (ens10, enp7s0, ...), so it
    is looked up from the subnet on the host itself and never hard-coded.
    """
    root = (layout or Layout()).root.rstrip("/")
    return f"""
# The private network may attach a little after boot: wait for it, bounded.
private_iface=""
for _ in $(seq 1 60); do
  private_iface=$(ip -o -4 addr show to {subnet_cidr} | awk '{{print $2; exit}}')
  [ -n "$private_iface" ] && break
  sleep 2
done
public_iface=$(ip -o -4 route show default | awk '{{print $5; exit}}')
if [ -z "$private_iface" ]; then
  echo "hcloud-ha-web: no interface with an address in {subnet_cidr}" >&2; exit 1
fi
mkdir -p {root}/etc/hcloud-ha-web {root}/etc/keepalived
printf 'PRIVATE_IFACE=%s\\nPUBLIC_IFACE=%s\\n' "$private_iface" "${{public_iface:-eth0}}" \\
  > {root}/etc/hcloud-ha-web/interfaces.env
printf '$PRIVATE_IFACE=%s\\n' "$private_iface" > {root}/etc/keepalived/interfaces.conf
""".strip()
