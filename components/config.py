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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi

PROJECT = "hcloud-ha-web"

#: Hetzner location -> network zone of its cloud networks.
NETWORK_ZONES: Mapping[str, str] = {
    "fsn1": "eu-central",
    "nbg1": "eu-central",
    "hel1": "eu-central",
    "ash": "us-east",
    "hil": "us-west",
    "sin": "ap-southeast",
}

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
# Host offsets inside the subnet for the default private IPs (lb1=.11, web1=.21, ...).
LB_HOST_OFFSET = 10
WEB_HOST_OFFSET = 20
MAX_WEB_SERVERS = 50


class SettingsError(ValueError):
    """A config value is missing or wrong; the message names key, value and fix."""

    def __init__(self, key: str, value: object, fix: str) -> None:
        self.key = key
        self.value = value
        super().__init__(f"config '{PROJECT}:{key}' = {value!r} is invalid: {fix}")


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
    vrrp_advert_interval: float = 0.3
    """`vrrpAdvertInterval`: seconds between VRRP adverts; host loss is seen after ~3x."""
    haproxy_check_interval_ms: int = 500
    """`haproxyCheckIntervalMs`: HAProxy health-check interval per web server."""
    haproxy_check_fall: int = 2
    """`haproxyCheckFall`: failed checks before a web server is marked down."""
    haproxy_check_rise: int = 2
    """`haproxyCheckRise`: passed checks before a web server is marked up again."""
    cluster_name: str = PROJECT
    """`clusterName`: prefix of resource names and the `cluster` label."""

    def __post_init__(self) -> None:
        validate(self)

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


def _parse_net(key: str, value: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        raise SettingsError(key, value, f"give an IPv4 network in CIDR form ({err})") from None
    _check(isinstance(net, ipaddress.IPv4Network), key, value, "give an IPv4 network")
    assert isinstance(net, ipaddress.IPv4Network)
    return net


def parse_ssh_public_key(value: str) -> str:
    """Return the key type if `value` is one OpenSSH public key line, else raise."""
    fix = "give one OpenSSH public key line, e.g. the content of ~/.ssh/id_ed25519.pub"
    if "PRIVATE KEY" in value:
        # Never echo a private key into logs; say what it is instead.
        raise SettingsError(
            "sshPublicKey", "<a private key, not shown>", f"that is a private key; {fix}"
        )
    parts = value.strip().split()
    _check(len(parts) >= 2 and "\n" not in value.strip(), "sshPublicKey", value, fix)
    key_type, blob = parts[0], parts[1]
    _check(key_type in SSH_KEY_TYPES, "sshPublicKey", value, f"unknown key type; {fix}")
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        embedded = raw[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise SettingsError("sshPublicKey", value, f"the key data is not valid; {fix}") from None
    _check(embedded == key_type, "sshPublicKey", value, f"key data does not match type; {fix}")
    return key_type


# No whitespace, quotes or backslash: the URL goes into a file read by the event hook.
_WEBHOOK_RE = re.compile(
    r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~!$&()*+,;=:@%/?-]*)?"
)


def check_alert_webhook_url(value: str) -> None:
    """Raise SettingsError (without echoing the secret URL) unless it is a plain http(s) URL."""
    _check(
        _WEBHOOK_RE.fullmatch(value) is not None,
        "alertWebhookUrl",
        "<secret, not shown>",
        "give an http(s) URL without spaces or quotes, e.g. https://hooks.example.com/T0KEN",
    )


_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]*[A-Za-z0-9._~-]$")
_COOKIE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def validate(s: Settings) -> None:
    """Raise SettingsError for the first bad value in `s`."""
    _check(
        s.location in NETWORK_ZONES,
        "location",
        s.location,
        f"use one of {', '.join(sorted(NETWORK_ZONES))}",
    )
    _check(bool(s.server_type.strip()), "serverType", s.server_type, "name a type, e.g. cx23")
    _check(bool(s.image.strip()), "image", s.image, "name an image, e.g. debian-13")
    _check(
        bool(_NAME_RE.match(s.cluster_name)),
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
    _check(
        len(s.admin_cidrs) > 0,
        "adminCidrs",
        list(s.admin_cidrs),
        "list the CIDRs allowed to SSH, e.g. [203.0.113.7/32]",
    )
    for cidr in s.admin_cidrs:
        try:
            ipaddress.ip_network(cidr, strict=True)
        except ValueError as err:
            raise SettingsError(
                "adminCidrs", cidr, f"give CIDRs like 203.0.113.7/32 ({err})"
            ) from None
        _check(
            ipaddress.ip_network(cidr).prefixlen > 0,
            "adminCidrs",
            cidr,
            "SSH must not be open to the world; list your own addresses",
        )
    network = _parse_net("networkCidr", s.network_cidr)
    _check(network.is_private, "networkCidr", s.network_cidr, "use a private range (RFC 1918)")
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
        bool(_COOKIE_RE.match(s.cookie_name)),
        "cookieName",
        s.cookie_name,
        "use letters, digits, '_' or '-'",
    )
    _check(
        bool(_PATH_RE.match(s.health_check_path)) and "//" not in s.health_check_path,
        "healthCheckPath",
        s.health_check_path,
        "use an absolute URL path to a file, e.g. /check.txt",
    )
    _check(bool(_USER_RE.match(s.stats_user)), "statsUser", s.stats_user, "use a plain user name")
    _check(
        re.match(r"^https?://[^\s'\"]+$", s.hetzner_api_endpoint) is not None,
        "hetznerApiEndpoint",
        s.hetzner_api_endpoint,
        "give an http(s) URL such as https://api.hetzner.cloud/v1",
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
}
_FLOAT_FIELDS = {"vrrpAdvertInterval": "vrrp_advert_interval"}
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
}
_LIST_FIELDS = {
    "adminCidrs": "admin_cidrs",
    "lbPrivateIps": "lb_private_ips",
    "webPrivateIps": "web_private_ips",
}
REQUIRED_KEYS = ("adminCidrs",)


def settings_from_values(get: Callable[[str], Any]) -> Settings:
    """Build Settings from a key lookup returning raw config values (or None)."""
    kwargs: dict[str, Any] = {}
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
                raise SettingsError(key, value, "give a number of seconds") from None
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
    for key, attr in _LIST_FIELDS.items():
        config[key] = json.dumps(list(getattr(settings, attr)))
    return config


def load_settings(config: pulumi.Config | None = None) -> StackConfig:
    """Read and validate the stack's config; raises SettingsError before any resource."""
    cfg = config or pulumi.Config(PROJECT)

    def get(key: str) -> Any:
        if key in _LIST_FIELDS:
            return cfg.get_object(key)
        return cfg.get(key)

    settings = settings_from_values(get)
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
    failover_token = _get_secret(cfg, "failoverToken") or _get_secret(
        pulumi.Config("hcloud"), "token"
    )
    _check(
        failover_token is not None,
        "failoverToken",
        None,
        "set a Hetzner API token for the failover script: "
        "pulumi config set --secret failoverToken <token> (or set hcloud:token)",
    )
    assert failover_token is not None
    webhook = cfg.get("alertWebhookUrl")
    if webhook is not None and webhook.strip():
        check_alert_webhook_url(webhook.strip())
    secrets = SecretInputs(
        ssh_private_key=ssh_private_key,
        failover_token=failover_token,
        stats_password=_get_secret(cfg, "statsPassword"),
        vrrp_password=_get_secret(cfg, "vrrpPassword"),
        alert_webhook_url=_get_secret(cfg, "alertWebhookUrl"),
    )
    return StackConfig(settings=settings, secrets=secrets)


def _get_secret(cfg: pulumi.Config, key: str) -> pulumi.Output[str] | None:
    """The value as a secret output; None when unset or blank.

    Pulumi.yaml declares the optional secrets with default "" (a typed key without a
    default would be required), so blank has to mean "not set".
    """
    raw = cfg.get(key)
    if raw is None or not raw.strip():
        return None
    return cfg.get_secret(key)
