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
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2

from components.acme_account import AccountKey, account_key_from_b64
from components.config import Settings, validate_secret
from components.rolling import web_waves
from components.site import DOCROOT, PLACEHOLDER, RELEASE_URL

Role = Literal["lb", "web"]

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
HEALTH_PORT = 8405  # HAProxy's local health endpoint, checked by keepalived
PRIMARY_PRIORITY = 150
BACKUP_PRIORITY = 100
#: More than the gap between the two, less than the backup's priority: an LB without a
#: certificate yields the floating IP to a peer that has one, and still takes it when the
#: peer is gone (or has none either).
CERT_MISSING_PENALTY = 60
# Seconds between the master's API ownership checks: 720 GETs/hour at most, within the
# project's 3600 requests/hour.
OWNERSHIP_CHECK_INTERVAL = 5
FAILOVER_SCRIPT = "/usr/local/sbin/hcloud-floating-ip"
HAPROXY_WATCH = "/usr/local/sbin/hcloud-haproxy-watch"
#: What the watcher writes (0 HAProxy answers, 1 it is dead) and keepalived tracks.
HAPROXY_DOWN_FILE = "/run/hcloud-ha-web/haproxy-down"
#: The longest wait for a supervisor's restart of a dead HAProxy before failing over;
#: Debian's unit (Restart=always, RestartSec 100 ms) has it back in ~0.25 s.
HAPROXY_RESTART_WAIT = 1.0
TOKEN_FILE = "/etc/hcloud-ha-web/failover-token"
HAPROXY_STATE_DIR = "/var/lib/haproxy"
HAPROXY_STATE_FILE = f"{HAPROXY_STATE_DIR}/server-state"
# `show servers state` through the runtime socket into a file (temp file + rename).
_SAVE_STATE = (
    "import os,socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(5)\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(b'show servers state\\n')\n"
    "out=b''\n"
    "for _ in range(10000):\n"
    "    b=s.recv(65536)\n"
    "    if not b: break\n"
    "    out+=b\n"
    "tmp=sys.argv[2]+'.tmp'\n"
    "open(tmp,'wb').write(out)\n"
    "os.replace(tmp,sys.argv[2])\n"
)
#: Team contract: the failover script's outcome (JSON) and the operator's alert hook.
FAILOVER_STATE_FILE = "/var/lib/hcloud-ha-web/failover-state.json"
EVENT_HOOK = "/usr/local/sbin/hcloud-ha-web-event"
# Observability (issue 16): exporters listen on the private address only.
NODE_EXPORTER_PORT = 9100
HAPROXY_METRICS_PORT = 9101  # not 8404: the HTTPS work uses 127.0.0.1:8404 for the stats page
METRICS_SCRIPT = "/usr/local/sbin/hcloud-ha-web-metrics"
ALERT_URL_FILE = "/etc/hcloud-ha-web/alert-webhook-url"
STATE_DIR = "/var/lib/hcloud-ha-web"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
#: PEM bundles HAProxy serves (one cert + key per file); their expiry is exported.
CERT_GLOB = "/etc/haproxy/certs/*.pem"
METRICS_INTERVAL = 15
ALERT_ATTEMPTS = 5
ALERT_TIMEOUT = 5
#: Apache modules the site's virtual host uses (rewrite: for apacheConfig's rules).
APACHE_MODULES = ("remoteip", "usertrack", "rewrite")
_MODS = " ".join(APACHE_MODULES)
# --- HTTPS (issue 11): certificate paths and the ACME client (dehydrated) ---------------
TLS_CERT = "/etc/haproxy/certs/site.pem"
"""Certificate + key HAProxy serves (0600); a placeholder until the first issuance."""
ACME_CONF_DIR = "/etc/hcloud-ha-web/acme"
ACME_STATE_DIR = "/var/lib/hcloud-ha-web/acme"
CERT_STATE_FILE = "/var/lib/hcloud-ha-web/cert-state.json"
#: "1" while this LB has no usable CA-issued certificate (a fresh host before its first
#: issuance, an expired one), else "0"; written by the certificate script, tracked by
#: keepalived, which lowers the LB's priority by CERT_MISSING_PENALTY while it is 1.
CERT_MISSING_FLAG = "/var/lib/hcloud-ha-web/cert-missing"
CERT_SCRIPT = "/usr/local/sbin/hcloud-ha-web-cert"
ACME_RENEW_DAYS = 30
STATS_LOCAL_PORT = 8404
PLACEHOLDER_SUBJECT = "/O=hcloud-ha-web/CN=placeholder until the ACME certificate is issued"

#: Every host: automatic security updates, sshd (its checker), time synchronisation.
HOST_PACKAGES = ("unattended-upgrades", "openssh-server", "systemd-timesyncd")
PACKAGES: Mapping[Role, tuple[str, ...]] = {
    "lb": (
        "haproxy",
        "keepalived",
        "curl",
        "python3",
        "iproute2",
        "openssl",
        "dehydrated",
        "prometheus-node-exporter",
        *HOST_PACKAGES,
    ),
    "web": ("apache2", "curl", "iproute2", "prometheus-node-exporter", *HOST_PACKAGES),
}
#: Unattended reboots (autoReboot) start here and go 30 minutes apart per host group.
REBOOT_WINDOW_START = (2, 0)


def haproxy_quote(value: str) -> str:
    """One HAProxy config word holding `value` as it is: single quotes take everything
    literally (blanks, '#', '$', '\\'); a quote itself is closed, escaped and reopened, as
    in sh. Values with control characters are refused before rendering (config.py)."""
    return "'" + value.replace("'", "'\\''") + "'"


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,  # HAProxy rejects a config without a final newline
    trim_blocks=True,
    lstrip_blocks=True,
    autoescape=False,
)
_ENV.filters["haproxy_quote"] = haproxy_quote


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
for m in {mods}; do ln -sf ../mods-available/$m.load "$cfg/mods-enabled/$m.load"; done
ln -sf ../sites-available/hcloud-ha-web.conf "$cfg/sites-enabled/hcloud-ha-web.conf"
rm -f "$cfg/sites-enabled/000-default.conf"
# envvars reads variables it may not find set: source it without the step's `set -u`
(set +u && . /etc/apache2/envvars && export APACHE_RUN_DIR="$cfg/run" \
  && mkdir -p "$APACHE_RUN_DIR" && apache2 -t -d "$cfg" -f "$cfg/apache2.conf")
""".replace("{mods}", _MODS)

# Debian's unit runs `prometheus-node-exporter $ARGS`: the exporter itself parses the
# flags (`--version` last, so a bad flag fails), and the listen address must be an address,
# not the wildcard.
_NODE_EXPORTER_VALIDATE = r"""
. $STAGE{root}/etc/default/prometheus-node-exporter
case " $ARGS " in *" --web.listen-address="[0-9]*) ;; *)
  echo "node exporter must listen on the private address: $ARGS" >&2; exit 1 ;; esac
prometheus-node-exporter $ARGS --version >/dev/null
"""
_NODE_EXPORTER_ACTIVATE = (
    "systemctl enable -q prometheus-node-exporter && systemctl restart prometheus-node-exporter"
)


def _node_exporter(role: Role) -> DaemonSpec:
    return DaemonSpec(
        name="exporter",
        role=role,
        files=(
            FileSpec("ops/prometheus-node-exporter.j2", "/etc/default/prometheus-node-exporter"),
        ),
        validate=_NODE_EXPORTER_VALIDATE,
        activate=_NODE_EXPORTER_ACTIVATE,
    )


# sshd -t on the host's sshd_config with the staged drop-ins in place of the live ones,
# then sshd -T: the values that win (sshd keeps the first it reads) must be ours.
_SSHD_VALIDATE = r"""
base={root}/etc/ssh; [ -f "$base/sshd_config" ] || base=/etc/ssh
cfg=$(mktemp -d); trap 'rm -rf "$cfg"' EXIT
mkdir -p "$cfg/sshd_config.d" /run/sshd
if [ -d "$base/sshd_config.d" ]; then cp -a "$base/sshd_config.d/." "$cfg/sshd_config.d/"; fi
cp -a "$STAGE{root}/etc/ssh/sshd_config.d/." "$cfg/sshd_config.d/"
sed "s#/etc/ssh/sshd_config.d/#$cfg/sshd_config.d/#" "$base/sshd_config" > "$cfg/sshd_config"
/usr/sbin/sshd -t -f "$cfg/sshd_config"
eff=$(/usr/sbin/sshd -T -f "$cfg/sshd_config" -C user=root,host=check,addr=192.0.2.1)
for want in "passwordauthentication no" "kbdinteractiveauthentication no"; do
  printf '%s\n' "$eff" | grep -qx "$want" || { echo "sshd would not apply: $want" >&2; exit 1; }
done
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

# apt-config parses each staged file (a syntax error fails), then reads the host's apt
# config plus ours, as unattended-upgrade will: only the security origin may be left.
_UPDATES_VALIDATE = r"""
dir=$STAGE{root}/etc/apt/apt.conf.d
for f in "$dir"/*; do apt-config -c "$f" dump >/dev/null; done
eff=$(apt-config -c "$dir/52hcloud-ha-web-unattended-upgrades" dump Unattended-Upgrade)
origins=$(printf '%s\n' "$eff" | grep '^Unattended-Upgrade::Origins-Pattern:: ')
[ "$(printf '%s\n' "$origins" | wc -l)" = 1 ] && printf '%s\n' "$origins" | grep -q 'security' \
  || { printf 'unattended-upgrades would not be security-only:\n%s\n' "$eff" >&2; exit 1; }
"""

# timesyncd has no checker: accept only the [Time] keys this file sets.
_TIMESYNC_VALIDATE = r"""
f=$STAGE{root}/etc/systemd/timesyncd.conf.d/50-hcloud-ha-web.conf
grep -qx '\[Time\]' "$f" && grep -q '^NTP=[a-z0-9. -]*$' "$f" \
  && ! grep -vE '^(#.*|\[Time\]|NTP=[a-z0-9. -]*|FallbackNTP=[a-z0-9. -]*|)$' "$f"
"""


def _host_daemons(role: Role) -> tuple[DaemonSpec, ...]:
    """What every server gets, whatever its role: sshd, security updates, the clock."""
    return (
        DaemonSpec(
            name="sshd",
            role=role,
            files=(FileSpec("host/sshd.conf.j2", "/etc/ssh/sshd_config.d/10-hcloud-ha-web.conf"),),
            validate=_SSHD_VALIDATE,
            # Not reload: on SIGHUP sshd re-executes itself and re-binds its socket after
            # systemctl has returned, and a Debian 12 host refused the next step's login
            # in that gap. restart waits for the new sshd's readiness (Type=notify) and
            # keeps open sessions (KillMode=process); then check it listens (bounded).
            activate=(
                "systemctl restart ssh && for _ in $(seq 1 50); do"
                " ss -Hltnp | grep -q '\"sshd\"' && break; sleep 0.1; done"
                " && ss -Hltnp | grep -q '\"sshd\"'"
            ),
        ),
        DaemonSpec(
            name="updates",
            role=role,
            files=(
                FileSpec("host/20auto-upgrades.j2", "/etc/apt/apt.conf.d/20auto-upgrades"),
                FileSpec(
                    "host/unattended-upgrades.j2",
                    "/etc/apt/apt.conf.d/52hcloud-ha-web-unattended-upgrades",
                ),
            ),
            validate=_UPDATES_VALIDATE,
            # Nothing to reload: Debian's apt timers (enabled by the apt package) start
            # unattended-upgrade daily, and it reads this config at every run.
            activate="true",
        ),
        DaemonSpec(
            name="timesync",
            role=role,
            files=(
                FileSpec(
                    "host/timesyncd.conf.j2",
                    "/etc/systemd/timesyncd.conf.d/50-hcloud-ha-web.conf",
                ),
            ),
            validate=_TIMESYNC_VALIDATE,
            # In a container systemd skips timesyncd (the host keeps the clock): a
            # restart then succeeds without starting it.
            activate="systemctl enable -q systemd-timesyncd && systemctl restart systemd-timesyncd",
        ),
    )


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
            FileSpec("apache2/site.conf.j2", "/etc/apache2/hcloud-ha-web/site.conf"),
            # The placeholder release and the health-check file: the site steps switch
            # between releases and never touch health/.
            FileSpec("www/index.html.j2", f"{DOCROOT}/{PLACEHOLDER}/site/index.html"),
            FileSpec("www/check.txt.j2", f"{DOCROOT}/health{{health_check_path}}"),
        ),
        validate=_APACHE_VALIDATE,
        activate=(
            f"a2enmod -q {_MODS} && a2ensite -q hcloud-ha-web"
            " && { a2dissite -q 000-default 2>/dev/null || true; }"
            " && systemctl enable -q apache2"
            # The document root is current/site; the site step owns the symlink later.
            f" && {{ [ -e {{root}}{DOCROOT}/current ]"
            f" || ln -sfn {PLACEHOLDER} {{root}}{DOCROOT}/current; }}"
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
        # The servers' states (DOWN, drained) survive the reload: saved just before it,
        # loaded by the new process (`server-state-file`, `load-server-state-from-file`).
        activate=(
            "mkdir -p {root}" + HAPROXY_STATE_DIR + " && if [ -S {root}/run/haproxy/admin.sock ];"
            " then python3 -c " + shlex.quote(_SAVE_STATE) + " {root}/run/haproxy/admin.sock"
            " {root}" + HAPROXY_STATE_FILE + " || echo 'hcloud-ha-web: server states not saved'"
            " >&2; fi && systemctl enable -q haproxy && systemctl reload-or-restart haproxy"
        ),
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
        name="ops",
        role="lb",
        files=(
            FileSpec("ops/hcloud-ha-web-metrics.j2", METRICS_SCRIPT, "0755"),
            FileSpec("ops/hcloud-ha-web-event.j2", EVENT_HOOK, "0755"),
            FileSpec("ops/alert-webhook-url.j2", ALERT_URL_FILE, "0600"),
            FileSpec(
                "ops/hcloud-ha-web-metrics.service.j2",
                "/etc/systemd/system/hcloud-ha-web-metrics.service",
            ),
            FileSpec(
                "ops/hcloud-ha-web-metrics.timer.j2",
                "/etc/systemd/system/hcloud-ha-web-metrics.timer",
            ),
        ),
        validate=(
            f"python3 -m py_compile $STAGE{{root}}{METRICS_SCRIPT}"
            f" && python3 -m py_compile $STAGE{{root}}{EVENT_HOOK}"
            f" && rm -rf $STAGE{{root}}{Path(METRICS_SCRIPT).parent}/__pycache__"
            " && units=$STAGE{root}/etc/systemd/system"
            " && grep -q '^ExecStart=/' $units/hcloud-ha-web-metrics.service"
            " && grep -q '^OnUnitActiveSec=[0-9]' $units/hcloud-ha-web-metrics.timer"
        ),
        activate=(
            f"{METRICS_SCRIPT} collect && systemctl daemon-reload"
            " && systemctl enable -q --now hcloud-ha-web-metrics.timer"
        ),
    ),
    DaemonSpec(
        name="watcher",
        role="lb",
        files=(
            FileSpec("keepalived/haproxy-watch.j2", HAPROXY_WATCH, "0755"),
            FileSpec(
                "keepalived/hcloud-haproxy-watch.service.j2",
                "/etc/systemd/system/hcloud-haproxy-watch.service",
            ),
        ),
        validate=(
            f"python3 -m py_compile $STAGE{{root}}{HAPROXY_WATCH} && rm -rf $STAGE{{root}}"
            f"{Path(HAPROXY_WATCH).parent}/__pycache__"
            " && grep -q '^ExecStart=/usr/bin/python3 '"
            " $STAGE{root}/etc/systemd/system/hcloud-haproxy-watch.service"
        ),
        activate=(
            "systemctl daemon-reload && systemctl enable -q hcloud-haproxy-watch"
            " && systemctl restart hcloud-haproxy-watch"
        ),
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
    *_host_daemons("web"),
    *_host_daemons("lb"),
    _node_exporter("lb"),
    _node_exporter("web"),
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
    """Secret values as they reach the files: configured or generated, checked alike."""

    stats_password: str = field(repr=False)
    vrrp_password: str = field(repr=False)
    failover_token: str = field(repr=False)
    acme_account_seed: str = field(default="", repr=False)
    """Base64 seed of the shared ACME account key (components/acme_account.py)."""
    alert_webhook_url: str = field(default="", repr=False)
    """Empty: no webhook; the event hook then posts nothing."""

    def __post_init__(self) -> None:
        # Generated values pass here too (pulumi_random in components/cluster.py).
        validate_secret("statsPassword", self.stats_password)
        validate_secret("vrrpPassword", self.vrrp_password)
        validate_secret("failoverToken", self.failover_token)

    def masks(self) -> tuple[str, ...]:
        """Every form a secret takes in a rendered file, longest first: what a step
        replaces before it prints a checker's output."""
        forms = {
            form
            for value in (self.stats_password, self.vrrp_password, self.failover_token)
            for form in (value, haproxy_quote(value))
        }
        return tuple(sorted(forms, key=lambda f: (-len(f), f)))


@dataclass(frozen=True)
class Layout:
    """Where a host's files live. Production uses the defaults; the lab sets a prefix."""

    root: str = ""
    """Prefix of every path the files name (the lab gives each host its own tree)."""
    haproxy_log_target: str = "/dev/log"
    """HAProxy `log` target: the journal via /dev/log, or `stdout` in the lab."""
    haproxy_unit: str = "haproxy.service"
    """The unit whose restarts the HAProxy watcher waits for; empty: no supervisor."""
    failover_log_file: str = ""
    """Empty: the failover script logs to the journal; else it appends to this file."""
    acme_ca_bundle: str = ""
    """Lab only: the CA file the ACME client trusts for the ACME server (Pebble's API)."""
    haproxy_reload_command: str = "systemctl reload haproxy"
    """How the cert script reloads HAProxy if the runtime API refuses a new certificate."""
    systemd: bool = True
    """False in the lab: the cert script's `activate` then leaves units alone."""
    ops_log_file: str = ""
    """Empty: the metrics script and the event hook log to the journal; else this file."""


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
        "state_file": root + FAILOVER_STATE_FILE,
        "event_hook": root + EVENT_HOOK,
        "log_file": layout.failover_log_file,
        "haproxy_log_target": layout.haproxy_log_target,
        "haproxy_unit": layout.haproxy_unit,
        "haproxy_down_file": root + HAPROXY_DOWN_FILE,
        "haproxy_restart_wait": HAPROXY_RESTART_WAIT,
        "docroot": root + DOCROOT,
        "haproxy_state_file": root + HAPROXY_STATE_FILE,
        "node_exporter_port": NODE_EXPORTER_PORT,
        "haproxy_metrics_port": HAPROXY_METRICS_PORT,
        "metrics_script": root + METRICS_SCRIPT,
        "alert_url_file": root + ALERT_URL_FILE,
        "alert_webhook_url": secrets.alert_webhook_url,
        "alert_attempts": ALERT_ATTEMPTS,
        "alert_timeout": ALERT_TIMEOUT,
        "state_dir": root + STATE_DIR,
        "textfile_dir": root + TEXTFILE_DIR,
        "keepalived_pid_file": root + "/run/keepalived.pid",
        "cert_glob": root + CERT_GLOB,
        "reboot_flag": root + "/run/reboot-required",
        "metrics_interval": METRICS_INTERVAL,
        "ops_log_file": layout.ops_log_file,
        "haproxy_socket": root + "/run/haproxy/admin.sock",
        "release_url": RELEASE_URL,
        "apache_config": settings.apache_config_text,
        "auto_reboot": settings.auto_reboot,
        "reboot_time": reboot_time(settings, host.name),
        "maxconn": haproxy_maxconn(settings.server_memory_mib),
        "server_maxconn": SERVER_MAXCONN,
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
        "cert_missing_flag": root + CERT_MISSING_FLAG,
        "cert_missing_penalty": CERT_MISSING_PENALTY,
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


#: Per web server: Apache's MaxRequestWorkers on Debian (mpm_event, 150). HAProxy queues
#: what is beyond it (timeout queue) instead of piling it onto one Apache.
SERVER_MAXCONN = 150
#: Memory HAProxy may plan for per connection: two 16 KiB buffers per side plus the
#: kernel's socket buffers, rounded up; a quarter of the LB's memory goes to connections.
CONNECTION_BUDGET_BYTES = 64 * 1024


#: Two file descriptors per connection must stay under systemd's default hard
#: RLIMIT_NOFILE (524288), which haproxy.service does not raise.
MAX_MAXCONN = 200_000


def haproxy_maxconn(memory_mib: int) -> int:
    """Connections one LB accepts at once, sized to its memory (4 GiB: 16384)."""
    by_memory = memory_mib * 1024 * 1024 // 4 // CONNECTION_BUDGET_BYTES
    return max(1024, min(MAX_MAXCONN, by_memory))


def reboot_time(settings: Settings, host_name: str) -> str:
    """When unattended-upgrades may reboot `host_name`: lb1, lb2, then each web wave,
    30 minutes apart, so the two LBs (or a whole wave plus another) never reboot together."""
    slots = [*((lb,) for lb in settings.lb_names), *web_waves(settings.web_names)]
    index = next(i for i, group in enumerate(slots) if host_name in group)
    minutes = REBOOT_WINDOW_START[0] * 60 + REBOOT_WINDOW_START[1] + 30 * index
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


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
