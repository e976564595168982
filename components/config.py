"""Settings: every knob of the cluster, its default, and its validation, in one place.

`Settings` holds plain values only, so rendering, tests and the lab can build one
directly. Secrets live in `SecretInputs` (Pulumi outputs) and never in `Settings`.
`load_settings()` reads both from `pulumi.Config` and raises `SettingsError`, naming the
config key, the bad value and the fix, before a single resource is registered.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from components.hetzner import (  # noqa: F401 - re-exported: the settings' facts
    IMAGES,
    NETWORK_MAX_PREFIX,
    NETWORK_ZONES,
    RFC1918,
    SERVER_TYPES,
    UNLISTED_MEMORY_MIB,
    ServerTypeInfo,
)
from components.site import RELEASE_URL, project_path, site_problem

PROJECT = "hcloud-ha-web"

#: Benchmark addresses (RFC 2544) the lab uses; only `Settings(lab=True)` accepts them.
LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")

BALANCE_ALGORITHMS = ("roundrobin", "leastconn")
COOKIE_MODES = ("prefix", "insert")
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING_DIRECTORY = "https://acme-staging-v02.api.letsencrypt.org/directory"
# One day: browsers remember HSTS for max-age and then refuse any way around a broken or
# expired certificate, so a long value turns one bad renewal into an outage nobody can click
# through. Raise it (hstspreload.org suggests steps up to two years) once renewals are proven.
DEFAULT_HSTS_MAX_AGE = 86_400
MAX_HSTS_MAX_AGE = 63_072_000  # two years, the longest value browsers are asked to keep
# Host offsets inside the subnet for the default private IPs (lb1=.11, web1=.21, ...).
#: Debian policy 5.6.1: package names are lowercase letters, digits, + - . (2+ chars).
DEBIAN_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
MAX_APACHE_CONFIG_BYTES = 64 * 1024
LB_HOST_OFFSET = 10
WEB_HOST_OFFSET = 20
MAX_WEB_SERVERS = 50


class SettingsError(ValueError):
    """A config value is missing or wrong; the message names key, value and fix."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key = key
        self.value = value
        shown = value if isinstance(value, _Hidden) else repr(value)
        super().__init__(f"config '{PROJECT}:{key}' = {shown} is invalid: {fix}")


class _Hidden(str):
    """Stands in for a secret value in an error message."""


HIDDEN = _Hidden("<secret, not shown>")


@dataclass(frozen=True)
class Settings:
    """Every setting of one stack. Field names map to camelCase config keys."""

    admin_cidrs: tuple[str, ...]
    """`adminCidrs` (required): CIDRs allowed to reach SSH (22) on every server."""
    ssh_public_key: str = ""
    """`sshPublicKey`: OpenSSH public key installed for root on every server. Empty: the
    program generates an ED25519 key pair (kept secret in the state, public half exported)."""
    location: str = "nbg1"
    """`location`: Hetzner location; decides the network zone (see NETWORK_ZONES)."""
    server_type: str = "cx23"
    """`serverType`: Hetzner server type of every server."""
    image: str = "debian-13"
    """`image`: OS image; the templates target Debian 12 and 13."""
    web_count: int = 2
    """`webCount`: number of Apache web servers behind the load balancers."""
    network_cidr: str = "10.0.0.0/16"
    """`networkCidr`: IP range of the Hetzner cloud network."""
    subnet_cidr: str = "10.0.1.0/24"
    """`subnetCidr`: the cloud subnet inside the network holding every server."""
    lb_private_ips: tuple[str, ...] = ()
    """`lbPrivateIps`: two fixed private IPs for lb1, lb2 (default: subnet .11, .12)."""
    web_private_ips: tuple[str, ...] = ()
    """`webPrivateIps`: one fixed private IP per web server (default: subnet .21, .22, ...)."""
    health_check_path: str = "/check.txt"
    """`healthCheckPath`: file HAProxy requests with HEAD; kept out of the access log."""
    balance: str = "roundrobin"
    """`balance`: HAProxy algorithm, `roundrobin` or `leastconn`."""
    cookie_name: str = "JSESSIONID"
    """`cookieName`: session cookie used for persistence."""
    cookie_mode: str = "prefix"
    """`cookieMode`: `prefix` (the application's cookie, as the tutorial) or `insert`."""
    stats_user: str = "admin"
    """`statsUser`: user of the stats page at /haproxy?stats."""
    hetzner_api_endpoint: str = "https://api.hetzner.cloud/v1"
    """`hetznerApiEndpoint`: Hetzner API base URL the failover script calls."""
    vrrp_router_id: int = 51
    """`vrrpRouterId`: VRRP virtual router id (1-255), unique within the network."""
    vrrp_version: int = 3
    """`vrrpVersion`: 3 (sub-second adverts, no auth) or 2 (1 s adverts, PASS auth)."""
    vrrp_advert_interval: float = 0.2
    """`vrrpAdvertInterval`: seconds between VRRP adverts; host loss is seen after ~3x."""
    haproxy_check_interval_ms: int = 500
    """`haproxyCheckIntervalMs`: HAProxy health-check interval per web server."""
    haproxy_check_fall: int = 2
    """`haproxyCheckFall`: failed checks before a web server is marked down."""
    haproxy_check_rise: int = 2
    """`haproxyCheckRise`: passed checks before a web server is marked up again."""
    cluster_name: str = PROJECT
    """`clusterName`: prefix of resource names and the `cluster` label."""
    extra_ssh_public_keys: tuple[str, ...] = ()
    """`extraSshPublicKeys`: more OpenSSH public keys for root, beside sshPublicKey (a key
    rotation adds the new key here first; see the README)."""
    web_max_unavailable: float = 0.5
    """`webMaxUnavailable`: share of the web servers a rolling change may take out of
    service at once (0 < share <= 1; always at least two waves)."""
    allow_disruptive_changes: bool = False
    """`allowDisruptiveChanges`: let a change of location, networkCidr or clusterName
    through on a deployed stack (it rebuilds the cluster with downtime)."""
    # --- HTTPS (issue 11) -------------------------------------------------------------
    domains: tuple[str, ...] = ()
    """`domains`: DNS names the site answers on, the first is the primary. Empty: plain
    HTTP only, and the stats page only on each LB's localhost."""
    acme_email: str = ""
    """`acmeEmail`: contact address of the ACME account (required with `domains`)."""
    acme_directory: str = LETSENCRYPT_DIRECTORY
    """`acmeDirectory`: ACME directory URL (default: Let's Encrypt production)."""
    dns_zone: str = ""
    """`dnsZone`: a Hetzner DNS zone holding every domain; the program then creates their
    A records and the floating IP's reverse DNS. Empty: create the records yourself."""
    hsts_max_age: int = DEFAULT_HSTS_MAX_AGE
    """`hstsMaxAge`: Strict-Transport-Security max-age in seconds; 0 turns HSTS off."""
    allow_unlisted_server_type: bool = False
    """`allowUnlistedServerType`: accept a serverType missing from SERVER_TYPES (a type
    Hetzner added later); the HAProxy limits then assume the smallest memory."""
    auto_reboot: bool = False
    """`autoReboot`: let unattended-upgrades reboot a server when an update needs it (at
    staggered times: lb1, lb2 and the web waves never together). Off by default."""
    site_dir: str = ""
    """`siteDir`: local directory (absolute, or relative to the project) every web server
    serves, shipped as atomic releases; empty keeps the placeholder page naming the host."""
    site_releases: int = 3
    """`siteReleases`: releases kept on each web server (the live one included)."""
    web_packages: tuple[str, ...] = ()
    """`webPackages`: extra Debian packages the web servers' base step installs."""
    apache_config: str = ""
    """`apacheConfig`: local file of Apache directives included in the site's virtual
    host, checked by `apache2 -t` with the rest; empty for none."""
    lab: bool = field(default=False, repr=False)
    """Lab only, no config key: accept the lab's plain-HTTP fake API and its 198.18.0.0/15
    addresses. Only code builds it (lab/cluster.py `lab_settings`); `settings_from_values`
    never sets it, so stack config cannot reach it."""

    def __post_init__(self) -> None:
        validate(self)

    @property
    def site_path(self) -> Path | None:
        return project_path(self.site_dir) if self.site_dir else None

    @property
    def apache_config_text(self) -> str:
        """The apacheConfig file's directives ("" when unset)."""
        if not self.apache_config:
            return ""
        return project_path(self.apache_config).read_text(encoding="utf-8")

    @property
    def server_memory_mib(self) -> int:
        info = SERVER_TYPES.get(self.server_type)
        return info.memory_mib if info else UNLISTED_MEMORY_MIB

    @property
    def network_zone(self) -> str:
        return NETWORK_ZONES[self.location]

    @property
    def lb_ips(self) -> tuple[str, str]:
        ips = self.lb_private_ips or _default_ips(self.subnet_cidr, LB_HOST_OFFSET, 2)
        return (ips[0], ips[1])

    @property
    def web_ips(self) -> tuple[str, ...]:
        return self.web_private_ips or _default_ips(
            self.subnet_cidr, WEB_HOST_OFFSET, self.web_count
        )

    @property
    def lb_names(self) -> tuple[str, str]:
        return ("lb1", "lb2")

    @property
    def web_names(self) -> tuple[str, ...]:
        return tuple(f"web{i}" for i in range(1, self.web_count + 1))


@dataclass(frozen=True)
class SecretInputs:
    """Secret config values, kept as Pulumi secrets. None means: generate one."""

    ssh_private_key: pulumi.Output[str] | None
    """`sshPrivateKey`; None (with an empty sshPublicKey): generate a key pair."""
    failover_token: pulumi.Output[str]
    stats_password: pulumi.Output[str] | None = None
    vrrp_password: pulumi.Output[str] | None = None
    alert_webhook_url: pulumi.Output[str] | None = None
    """`alertWebhookUrl`: where the LBs POST alerts (JSON); None: no alerts."""


@dataclass(frozen=True)
class StackConfig:
    settings: Settings
    secrets: SecretInputs = field(repr=False)


def _default_ips(subnet: str, offset: int, count: int) -> tuple[str, ...]:
    net = ipaddress.ip_network(subnet)
    return tuple(str(net.network_address + offset + i) for i in range(1, count + 1))


def _check(ok: bool, key: str, value: object, fix: str) -> None:
    if not ok:
        raise SettingsError(key, value, fix)


_CIDR4_RE = re.compile(r"(?:[0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}")
_CIDR6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}/[0-9]{1,3}")


def _parse_net(key: str, value: str) -> ipaddress.IPv4Network:
    # ipaddress also takes netmask notation (10.0.0.0/255.255.0.0); Hetzner does not.
    _check(
        _CIDR4_RE.fullmatch(value) is not None,
        key,
        value,
        "give an IPv4 network as address/prefix length, e.g. 10.0.0.0/16",
    )
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        raise SettingsError(key, value, f"give an IPv4 network in CIDR form ({err})") from None
    _check(isinstance(net, ipaddress.IPv4Network), key, value, "give an IPv4 network")
    assert isinstance(net, ipaddress.IPv4Network)
    return net


def parse_ssh_public_key(value: str, key: str = "sshPublicKey") -> str:
    """Return the key type if `value` is one OpenSSH public key line, else raise."""
    fix = "give one OpenSSH public key line, e.g. the content of ~/.ssh/id_ed25519.pub"
    if "PRIVATE KEY" in value:
        # Never echo a private key into logs; say what it is instead.
        raise SettingsError(key, "<a private key, not shown>", f"that is a private key; {fix}")
    parts = value.strip().split()
    # The line goes into authorized_keys: one line, printable, no options before the type.
    _check(
        len(parts) >= 2 and "\n" not in value.strip() and value.strip().isprintable(),
        key,
        value,
        fix,
    )
    key_type, blob = parts[0], parts[1]
    _check(key_type in SSH_KEY_TYPES, key, value, f"unknown key type; {fix}")
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        embedded = raw[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise SettingsError(key, value, f"the key data is not valid; {fix}") from None
    _check(embedded == key_type, key, value, f"key data does not match type; {fix}")
    return key_type


# Every pattern is used with fullmatch: `$` would also accept a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?")
_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]*[A-Za-z0-9._~-]")
_COOKIE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_USER_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TYPE_RE = re.compile(r"[a-z0-9-]{2,32}")
_URL_RE = re.compile(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
_LAB_URL_RE = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?")
#: Printable ASCII: HAProxy gets it single-quoted (see render.haproxy_quote).
_STATS_PASSWORD_RE = re.compile(r"[\x20-\x7e]{1,128}")
#: keepalived splits words at blanks and starts comments at '#' or '!'; its PASS auth
#: carries 8 bytes at most.
_VRRP_PASSWORD_RE = re.compile(r"[A-Za-z0-9$%&()*+,./:;<=>?@\[\]^_`{|}~-]{1,8}")
#: The alert webhook URL goes into a file the event hook reads: no blanks, quotes or
#: backslash. http is allowed (a receiver on the private network).
_WEBHOOK_RE = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&()*+,;=:@%/?-]*)?"
)
#: RFC 6750 b64token: what an Authorization header can carry (Hetzner: 64 alphanumerics).
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]{16,256}=*")


def validate_secret(key: str, value: str) -> None:
    """Raise SettingsError (never showing the value) if `value` cannot go where `key` goes."""
    if key == "statsPassword":
        _check(
            _STATS_PASSWORD_RE.fullmatch(value) is not None,
            key,
            HIDDEN,
            "use 1-128 printable ASCII characters (no line breaks or tabs)",
        )
    elif key == "vrrpPassword":
        _check(
            _VRRP_PASSWORD_RE.fullmatch(value) is not None,
            key,
            HIDDEN,
            "use 1-8 printable characters without blanks, quotes, backslash, '#' or '!' "
            "(keepalived's PASS auth carries 8 and its parser splits at blanks and comments)",
        )
    elif key in ("failoverToken", "hcloud:token"):
        _check(
            TOKEN_RE.fullmatch(value) is not None,
            key,
            HIDDEN,
            "give the API token as Hetzner shows it: one line of letters and digits "
            "(Console > Security > API tokens)",
        )
    elif key == "alertWebhookUrl":
        _check(
            _WEBHOOK_RE.fullmatch(value) is not None,
            key,
            HIDDEN,
            "give an http(s) URL without spaces or quotes, e.g. https://hooks.example.com/T0KEN",
        )
    else:  # pragma: no cover - a programming error
        raise KeyError(key)


def validate(s: Settings) -> None:
    """Raise SettingsError for the first bad value in `s`."""
    _check(
        s.location in NETWORK_ZONES,
        "location",
        s.location,
        f"use one of {', '.join(sorted(NETWORK_ZONES))}",
    )
    _check_server_type(s)
    _check(
        bool(_NAME_RE.fullmatch(s.cluster_name)),
        "clusterName",
        s.cluster_name,
        "use lowercase letters, digits and dashes (max 42)",
    )
    _check(
        isinstance(s.web_count, int) and 1 <= s.web_count <= MAX_WEB_SERVERS,
        "webCount",
        s.web_count,
        f"use a whole number from 1 to {MAX_WEB_SERVERS}",
    )
    if s.ssh_public_key:
        parse_ssh_public_key(s.ssh_public_key)
    for extra in s.extra_ssh_public_keys:
        parse_ssh_public_key(extra, "extraSshPublicKeys")
    _check(
        isinstance(s.web_max_unavailable, float | int) and 0 < s.web_max_unavailable <= 1,
        "webMaxUnavailable",
        s.web_max_unavailable,
        "give a share of the web servers above 0 and at most 1, e.g. 0.5",
    )
    _check(
        len(s.admin_cidrs) > 0,
        "adminCidrs",
        list(s.admin_cidrs),
        "list the CIDRs allowed to SSH, e.g. [203.0.113.7/32]",
    )
    _check_admin_cidrs(s.admin_cidrs)
    network = _parse_net("networkCidr", s.network_cidr)
    in_rfc1918 = any(network.subnet_of(r) for r in RFC1918)
    in_lab = s.lab and network.subnet_of(LAB_RANGE)
    _check(
        in_rfc1918 or in_lab,
        "networkCidr",
        s.network_cidr,
        "Hetzner networks must lie in RFC 1918 space: 10.0.0.0/8, 172.16.0.0/12 or "
        "192.168.0.0/16, e.g. 10.0.0.0/16",
    )
    _check(
        network.prefixlen <= NETWORK_MAX_PREFIX,
        "networkCidr",
        s.network_cidr,
        f"Hetzner networks are /{NETWORK_MAX_PREFIX} or larger; use e.g. 10.0.0.0/16",
    )
    subnet = _parse_net("subnetCidr", s.subnet_cidr)
    _check(
        subnet.subnet_of(network),
        "subnetCidr",
        s.subnet_cidr,
        f"choose a subnet inside networkCidr {s.network_cidr}",
    )
    _check(
        subnet.num_addresses >= 16,
        "subnetCidr",
        s.subnet_cidr,
        "use a /28 or larger so every server gets an address",
    )
    _check(
        len(s.lb_private_ips) in (0, 2),
        "lbPrivateIps",
        list(s.lb_private_ips),
        "give exactly two addresses (lb1, lb2) or leave it unset",
    )
    _check(
        len(s.web_private_ips) in (0, s.web_count),
        "webPrivateIps",
        list(s.web_private_ips),
        f"give exactly webCount={s.web_count} addresses or leave it unset",
    )
    if not s.web_private_ips:
        last = subnet.network_address + WEB_HOST_OFFSET + s.web_count
        _check(
            last < subnet.broadcast_address,
            "webCount",
            s.web_count,
            f"subnet {s.subnet_cidr} is too small for the default addresses; "
            "use a larger subnetCidr or set webPrivateIps",
        )
    _check_private_ips(s, subnet)
    _check(s.balance in BALANCE_ALGORITHMS, "balance", s.balance, f"use {BALANCE_ALGORITHMS}")
    _check(s.cookie_mode in COOKIE_MODES, "cookieMode", s.cookie_mode, f"use {COOKIE_MODES}")
    _check(
        bool(_COOKIE_RE.fullmatch(s.cookie_name)),
        "cookieName",
        s.cookie_name,
        "use letters, digits, '_' or '-'",
    )
    _check(
        bool(_PATH_RE.fullmatch(s.health_check_path))
        and "//" not in s.health_check_path
        # the path also names a file below the docroot: no way out of it
        and not {".", ".."} & set(s.health_check_path.split("/")),
        "healthCheckPath",
        s.health_check_path,
        "use an absolute URL path to a file, e.g. /check.txt (no '.' or '..' segments)",
    )
    _check(
        bool(_USER_RE.fullmatch(s.stats_user)), "statsUser", s.stats_user, "use a plain user name"
    )
    _check(
        (_LAB_URL_RE if s.lab else _URL_RE).fullmatch(s.hetzner_api_endpoint) is not None,
        "hetznerApiEndpoint",
        s.hetzner_api_endpoint,
        "give an https URL such as https://api.hetzner.cloud/v1 (plain http would send "
        "the API token in clear text)",
    )
    _check(1 <= s.vrrp_router_id <= 255, "vrrpRouterId", s.vrrp_router_id, "use 1 to 255")
    _check(s.vrrp_version in (2, 3), "vrrpVersion", s.vrrp_version, "use 2 or 3")
    if s.vrrp_version == 2:
        _check(
            float(s.vrrp_advert_interval).is_integer() and 1 <= s.vrrp_advert_interval <= 255,
            "vrrpAdvertInterval",
            s.vrrp_advert_interval,
            "VRRPv2 needs whole seconds (1-255); use vrrpVersion 3 for sub-second adverts",
        )
    _check(
        0.01 <= s.vrrp_advert_interval <= 40.95,
        "vrrpAdvertInterval",
        s.vrrp_advert_interval,
        "use 0.01 to 40.95 seconds",
    )
    for key, value, low, high in (
        ("haproxyCheckIntervalMs", s.haproxy_check_interval_ms, 50, 60_000),
        ("haproxyCheckFall", s.haproxy_check_fall, 1, 20),
        ("haproxyCheckRise", s.haproxy_check_rise, 1, 20),
    ):
        _check(low <= value <= high, key, value, f"use {low} to {high}")
    _check_https(s)
    _check_site(s)


_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME_RE = re.compile(rf"(?:{_DNS_LABEL}\.)+(?!\d+$){_DNS_LABEL}")
_EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@(?P<domain>[a-z0-9.-]+)")
_DIRECTORY_RE = re.compile(r"https://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~%/-]*)?")


def is_dns_name(value: str) -> bool:
    """A fully qualified host name: lowercase LDH labels, at least two, not all digits at the
    end (an IP address is not a name), 253 characters at most, no trailing dot."""
    return len(value) <= 253 and _DNS_NAME_RE.fullmatch(value) is not None


def _check_https(s: Settings) -> None:
    for name in s.domains:
        _check(
            not name.startswith("*."),
            "domains",
            name,
            "http-01 cannot issue wildcard certificates; list each name",
        )
        _check(
            is_dns_name(name),
            "domains",
            name,
            "give a lowercase DNS name such as www.example.com (no scheme, port or dot at the end)",
        )
    _check(
        len(set(s.domains)) == len(s.domains),
        "domains",
        list(s.domains),
        "list each name once",
    )
    _check(len(s.domains) <= 100, "domains", len(s.domains), "an ACME order holds 100 names")
    email = _EMAIL_RE.fullmatch(s.acme_email)
    if s.domains or s.acme_email:
        _check(
            email is not None and is_dns_name(email.group("domain")),
            "acmeEmail",
            s.acme_email,
            "give the ACME account's contact address, e.g. admin@example.com"
            + (" (required with domains)" if s.domains else ""),
        )
    _check(
        _DIRECTORY_RE.fullmatch(s.acme_directory) is not None,
        "acmeDirectory",
        s.acme_directory,
        f"give the https URL of an ACME directory, e.g. {LETSENCRYPT_DIRECTORY}",
    )
    if s.dns_zone:
        _check(is_dns_name(s.dns_zone), "dnsZone", s.dns_zone, "give a zone name like example.com")
        _check(bool(s.domains), "dnsZone", s.dns_zone, "set domains too (records for what?)")
        for name in s.domains:
            _check(
                name == s.dns_zone or name.endswith("." + s.dns_zone),
                "domains",
                name,
                f"every domain must be inside dnsZone {s.dns_zone}",
            )
    _check(
        isinstance(s.hsts_max_age, int) and 0 <= s.hsts_max_age <= MAX_HSTS_MAX_AGE,
        "hstsMaxAge",
        s.hsts_max_age,
        f"use 0 (off) to {MAX_HSTS_MAX_AGE} seconds",
    )


def _check_site(s: Settings) -> None:
    """siteDir, siteReleases, webPackages, apacheConfig: local files are read here, so a
    bad one fails before any resource."""
    _check(2 <= s.site_releases <= 20, "siteReleases", s.site_releases, "use 2 to 20")
    for package in s.web_packages:
        _check(
            DEBIAN_PACKAGE_RE.fullmatch(package) is not None and len(package) <= 100,
            "webPackages",
            package,
            "give Debian package names (lowercase letters, digits, '+', '-', '.'), "
            "e.g. libapache2-mod-php",
        )
    if s.site_dir:
        problem = site_problem(project_path(s.site_dir), (s.health_check_path, RELEASE_URL))
        _check(problem is None, "siteDir", s.site_dir, problem or "")
    if s.apache_config:
        _check("\0" not in s.apache_config, "apacheConfig", s.apache_config, "give a file path")
        path = project_path(s.apache_config)
        _check(
            path.is_file(),
            "apacheConfig",
            s.apache_config,
            f"{path} is not a file; give a file of Apache directives",
        )
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise SettingsError(
                "apacheConfig", s.apache_config, f"{path} is not readable ({err.strerror})"
            ) from None
        _check(
            len(raw) <= MAX_APACHE_CONFIG_BYTES,
            "apacheConfig",
            s.apache_config,
            f"keep it under {MAX_APACHE_CONFIG_BYTES // 1024} KiB",
        )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SettingsError(
                "apacheConfig", s.apache_config, "the file is not UTF-8 text"
            ) from None
        _check("\0" not in text, "apacheConfig", s.apache_config, "the file holds NUL bytes")


def _check_server_type(s: Settings) -> None:
    _check(
        _TYPE_RE.fullmatch(s.server_type) is not None,
        "serverType",
        s.server_type,
        "name a Hetzner server type, e.g. cx23",
    )
    _check(
        s.image in IMAGES,
        "image",
        s.image,
        f"the templates are written for {', '.join(IMAGES)}; use one of them",
    )
    info = SERVER_TYPES.get(s.server_type)
    if info is None:
        _check(
            s.allow_unlisted_server_type,
            "serverType",
            s.server_type,
            f"not in the table of known types ({', '.join(sorted(SERVER_TYPES))}); if "
            "Hetzner offers it now, set allowUnlistedServerType: true "
            "(components/config.py SERVER_TYPES says where the table comes from)",
        )
        return
    offered = [t for t, i in SERVER_TYPES.items() if s.location in i.locations]
    _check(
        s.location in info.locations,
        "serverType",
        s.server_type,
        f"not offered in {s.location} (offered there: {', '.join(sorted(offered))}); pick "
        "one of those or another location, or set allowUnlistedServerType: true if "
        "Hetzner has added it",
    )
    _check(
        info.architecture in IMAGES[s.image],
        "serverType",
        s.server_type,
        f"{info.architecture} type, but image {s.image} exists for "
        f"{', '.join(IMAGES[s.image])} only",
    )


def _check_admin_cidrs(cidrs: Sequence[str]) -> None:
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for cidr in cidrs:
        _check(
            _CIDR4_RE.fullmatch(cidr) is not None or _CIDR6_RE.fullmatch(cidr) is not None,
            "adminCidrs",
            cidr,
            "give CIDRs as address/prefix length, like 203.0.113.7/32",
        )
        try:
            nets.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError as err:
            raise SettingsError(
                "adminCidrs", cidr, f"give CIDRs like 203.0.113.7/32 ({err})"
            ) from None
    # Several CIDRs can open SSH to the world as surely as 0.0.0.0/0: subtract them from
    # the whole address space; what is left must include public addresses.
    for everything in (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")):
        left = [everything]
        for net in nets:
            if net.version != everything.version:
                continue
            left = [
                piece
                for rest in left
                for piece in (
                    rest.address_exclude(net)  # type: ignore[arg-type]
                    if net.subnet_of(rest)  # type: ignore[arg-type]
                    else ([] if rest.subnet_of(net) else [rest])  # type: ignore[arg-type]
                )
            ]
        _check(
            any(piece.is_global for piece in left),
            "adminCidrs",
            list(cidrs),
            f"together these open SSH to the whole {'IPv4' if everything.version == 4 else 'IPv6'}"
            " internet; list your own addresses (e.g. 203.0.113.7/32)",
        )


def _check_private_ips(s: Settings, subnet: ipaddress.IPv4Network) -> None:
    # Hetzner reserves the subnet's first address for its gateway.
    gateway = subnet.network_address + 1
    seen: dict[str, str] = {}
    key_of = {"lb": "lbPrivateIps", "web": "webPrivateIps"}
    for role, ips in (("lb", s.lb_ips), ("web", s.web_ips)):
        key = key_of[role]
        for ip in ips:
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError:
                raise SettingsError(key, ip, "give a plain IPv4 address") from None
            _check(
                addr in subnet and addr not in (subnet.network_address, subnet.broadcast_address),
                key,
                ip,
                f"use a host address inside subnetCidr {s.subnet_cidr}",
            )
            _check(addr != gateway, key, ip, f"{gateway} is the Hetzner gateway; pick another")
            _check(ip not in seen, key, ip, f"already used by {seen.get(ip)}; addresses collide")
            seen[ip] = role


# --- reading pulumi.Config -------------------------------------------------------------

_INT_FIELDS = {
    "webCount": "web_count",
    "vrrpRouterId": "vrrp_router_id",
    "vrrpVersion": "vrrp_version",
    "haproxyCheckIntervalMs": "haproxy_check_interval_ms",
    "haproxyCheckFall": "haproxy_check_fall",
    "haproxyCheckRise": "haproxy_check_rise",
    "hstsMaxAge": "hsts_max_age",
    "siteReleases": "site_releases",
}
_FLOAT_FIELDS = {
    "vrrpAdvertInterval": "vrrp_advert_interval",
    "webMaxUnavailable": "web_max_unavailable",
}
_BOOL_FIELDS = {
    "allowUnlistedServerType": "allow_unlisted_server_type",
    "autoReboot": "auto_reboot",
    "allowDisruptiveChanges": "allow_disruptive_changes",
}
_STR_FIELDS = {
    "location": "location",
    "serverType": "server_type",
    "image": "image",
    "networkCidr": "network_cidr",
    "subnetCidr": "subnet_cidr",
    "healthCheckPath": "health_check_path",
    "balance": "balance",
    "cookieName": "cookie_name",
    "cookieMode": "cookie_mode",
    "statsUser": "stats_user",
    "hetznerApiEndpoint": "hetzner_api_endpoint",
    "clusterName": "cluster_name",
    "acmeEmail": "acme_email",
    "acmeDirectory": "acme_directory",
    "dnsZone": "dns_zone",
    "siteDir": "site_dir",
    "apacheConfig": "apache_config",
}
_LIST_FIELDS = {
    "adminCidrs": "admin_cidrs",
    "lbPrivateIps": "lb_private_ips",
    "webPrivateIps": "web_private_ips",
    "extraSshPublicKeys": "extra_ssh_public_keys",
    "domains": "domains",
    "webPackages": "web_packages",
}
REQUIRED_KEYS = ("adminCidrs",)


def settings_from_values(get: Callable[[str], Any], *, lab: bool = False) -> Settings:
    """Build Settings from a key lookup returning raw config values (or None).

    `lab` is for the lab's own harness only (see Settings.lab); no config key sets it.
    """
    kwargs: dict[str, Any] = {"lab": lab}
    for key in REQUIRED_KEYS:
        value = get(key)
        _check(value not in (None, "", []), key, value, f"set it: pulumi config set {key} ...")
    kwargs["ssh_public_key"] = str(get("sshPublicKey") or "").strip()
    for key, attr in _STR_FIELDS.items():
        value = get(key)
        if value is not None:
            kwargs[attr] = str(value)
    for key, attr in _INT_FIELDS.items():
        value = get(key)
        if value is not None:
            try:
                kwargs[attr] = int(str(value))
            except ValueError:
                raise SettingsError(key, value, "give a whole number") from None
    for key, attr in _FLOAT_FIELDS.items():
        value = get(key)
        if value is not None:
            try:
                kwargs[attr] = float(str(value))
            except ValueError:
                raise SettingsError(key, value, "give a number") from None
    for key, attr in _BOOL_FIELDS.items():
        value = get(key)
        if value is not None:
            text = str(value).strip().lower()
            _check(text in ("true", "false"), key, value, "give true or false")
            kwargs[attr] = text == "true"
    for key, attr in _LIST_FIELDS.items():
        value = get(key)
        if value is None:
            continue
        _check(
            isinstance(value, Sequence) and not isinstance(value, str),
            key,
            value,
            "give a YAML list of strings",
        )
        kwargs[attr] = tuple(str(v) for v in value)
    return Settings(**kwargs)


def settings_to_config(settings: Settings) -> dict[str, str]:
    """The stack config (project keys, raw string values) that `load_settings` reads back
    as `settings`; the inverse of `settings_from_values`. Lists are JSON, as
    `pulumi config set --path` stores them."""
    config = {"sshPublicKey": settings.ssh_public_key}
    for key, attr in (_STR_FIELDS | _INT_FIELDS | _FLOAT_FIELDS).items():
        config[key] = str(getattr(settings, attr))
    for key, attr in _BOOL_FIELDS.items():
        config[key] = "true" if getattr(settings, attr) else "false"
    for key, attr in _LIST_FIELDS.items():
        config[key] = json.dumps(list(getattr(settings, attr)))
    return config


def load_settings(config: pulumi.Config | None = None, *, lab: bool = False) -> StackConfig:
    """Read and validate the stack's config; raises SettingsError before any resource.

    `lab=True` is the lab-only path (lab/program.py, the local cloud tier): it lets the
    fake API's http URL and the 198.18.0.0/15 addresses through. __main__.py never sets it.
    """
    cfg = config or pulumi.Config(PROJECT)

    def get(key: str) -> Any:
        if key in _LIST_FIELDS:
            return cfg.get_object(key)
        return cfg.get(key)

    settings = settings_from_values(get, lab=lab)
    ssh_private_key = _get_secret(cfg, "sshPrivateKey")
    # Both halves or neither (then the program generates a pair).
    _check(
        ssh_private_key is not None or not settings.ssh_public_key,
        "sshPrivateKey",
        None,
        "sshPublicKey is set, so set its private half too: pulumi config set --secret "
        "sshPrivateKey < ~/.ssh/id_ed25519 (or unset sshPublicKey to get a generated pair)",
    )
    _check(
        ssh_private_key is None or bool(settings.ssh_public_key),
        "sshPublicKey",
        "",
        "sshPrivateKey is set, so set its public half too: pulumi config set sshPublicKey "
        '"$(cat ~/.ssh/id_ed25519.pub)" (or unset sshPrivateKey to get a generated pair)',
    )
    token_key = "failoverToken" if _raw(cfg, "failoverToken") else "hcloud:token"
    hcloud_cfg = pulumi.Config("hcloud")
    token_cfg = cfg if token_key == "failoverToken" else hcloud_cfg
    failover_token = _get_secret(token_cfg, token_key.removeprefix("hcloud:"))
    for key, source in (
        (token_key, token_cfg),
        ("statsPassword", cfg),
        ("vrrpPassword", cfg),
        ("alertWebhookUrl", cfg),
    ):
        raw = _raw(source, key.removeprefix("hcloud:"))
        if raw:
            validate_secret(key, raw)
    _check(
        not (_raw(cfg, "vrrpPassword") and settings.vrrp_version == 3),
        "vrrpPassword",
        HIDDEN,
        "VRRPv3 has no authentication, so the password would be ignored; unset it "
        "(pulumi config rm vrrpPassword) or use vrrpVersion 2",
    )
    _check(
        failover_token is not None,
        "failoverToken",
        None,
        "set a Hetzner API token for the failover script: "
        "pulumi config set --secret failoverToken <token> (or set hcloud:token)",
    )
    assert failover_token is not None
    secrets = SecretInputs(
        ssh_private_key=ssh_private_key,
        failover_token=failover_token,
        stats_password=_get_secret(cfg, "statsPassword"),
        vrrp_password=_get_secret(cfg, "vrrpPassword"),
        alert_webhook_url=_get_secret(cfg, "alertWebhookUrl"),
    )
    return StackConfig(settings=settings, secrets=secrets)


def _raw(cfg: pulumi.Config, key: str) -> str:
    """The plain value, only for validation (never logged); "" when unset or blank."""
    raw = cfg.get(key)
    return raw if raw is not None and raw.strip() else ""


def _get_secret(cfg: pulumi.Config, key: str) -> pulumi.Output[str] | None:
    """The value as a secret output; None when unset or blank.

    Pulumi.yaml declares the optional secrets with default "" (a typed key without a
    default would be required), so blank has to mean "not set".
    """
    raw = cfg.get(key)
    if raw is None or not raw.strip():
        return None
    return cfg.get_secret(key)
