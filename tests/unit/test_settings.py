"""Settings: defaults, config loading, every bad input, and the project/stack YAML files."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pulumi
import pytest
import yaml

from components import config as cfgmod
from components.config import PROJECT, Settings, SettingsError, load_settings
from tests.conftest import (
    ADMIN_CIDRS,
    FAILOVER_TOKEN,
    PRIVATE_KEY,
    PUBLIC_KEY,
    ROOT,
    RecordingMonitor,
    ed25519_public_key,
    is_secret,
    make_settings,
    resolve,
    run,
    run_main,
    valid_config,
)

SECRET_CONFIG_KEYS = {
    "sshPrivateKey",
    "failoverToken",
    "statsPassword",
    "vrrpPassword",
    "alertWebhookUrl",
}
#: Every config key the program reads (config.py's own tables plus its secret keys).
ALL_KEYS = (
    set(cfgmod._STR_FIELDS)
    | set(cfgmod._INT_FIELDS)
    | set(cfgmod._FLOAT_FIELDS)
    | set(cfgmod._BOOL_FIELDS)
    | set(cfgmod._LIST_FIELDS)
    | set(cfgmod._BOOL_FIELDS)
    | set(cfgmod.REQUIRED_KEYS)
    | {"sshPublicKey"}
    | SECRET_CONFIG_KEYS
)


def load(monitor: RecordingMonitor, **overrides: Any) -> cfgmod.StackConfig:
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    return run(load_settings)


# --- defaults and loading -------------------------------------------------------------------


def test_minimal_config_gives_the_documented_defaults(monitor: RecordingMonitor) -> None:
    s = load(monitor).settings
    assert (s.location, s.server_type, s.image, s.web_count) == ("nbg1", "cx23", "debian-13", 2)
    assert s.network_zone == "eu-central"
    assert s.admin_cidrs == ADMIN_CIDRS
    assert s.lb_ips == ("10.0.1.11", "10.0.1.12")
    assert s.web_ips == ("10.0.1.21", "10.0.1.22")


def test_values_are_parsed_from_config_strings(monitor: RecordingMonitor) -> None:
    s = load(
        monitor,
        location="ash",
        serverType="cpx21",
        webCount="3",
        vrrpAdvertInterval="1",
        vrrpVersion="2",
        webPrivateIps=json.dumps(["10.0.1.50", "10.0.1.51", "10.0.1.52"]),
    ).settings
    assert s.network_zone == "us-east"
    assert s.web_count == 3 and s.vrrp_version == 2 and s.vrrp_advert_interval == 1.0
    assert s.web_ips == ("10.0.1.50", "10.0.1.51", "10.0.1.52")


def test_secrets_are_read_as_secrets(monitor: RecordingMonitor) -> None:
    stack = load(
        monitor,
        statsPassword="s3cret-stats",
        vrrpPassword="vrrp1234",
        vrrpVersion="2",
        vrrpAdvertInterval="1",
    )
    secrets = stack.secrets
    for output, value in (
        (secrets.ssh_private_key, PRIVATE_KEY),
        (secrets.failover_token, FAILOVER_TOKEN),
        (secrets.stats_password, "s3cret-stats"),
        (secrets.vrrp_password, "vrrp1234"),
    ):
        assert is_secret(output)
        assert resolve(output) == value
    assert "PRIVATE" not in repr(stack) and FAILOVER_TOKEN not in repr(stack)


def test_blank_optional_secrets_mean_generate(monitor: RecordingMonitor) -> None:
    """Pulumi.yaml declares them with default "" (else the CLI would require them)."""
    stack = load(monitor, statsPassword="", vrrpPassword="  ")
    assert stack.secrets.stats_password is None
    assert stack.secrets.vrrp_password is None


def test_failover_token_falls_back_to_the_provider_token(monitor: RecordingMonitor) -> None:
    stack = load(monitor, failoverToken="", **{"hcloud:token": "provider-token-abc"})
    assert is_secret(stack.secrets.failover_token)
    assert resolve(stack.secrets.failover_token) == "provider-token-abc"


# --- every bad input fails before a single resource exists -----------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, config overrides, key named in the error, bad value shown in the error)
    ("unknown location", {"location": "nbg9"}, "location", "nbg9"),
    ("admin CIDR malformed", {"adminCidrs": ["198.51.100.300/32"]}, "adminCidrs", "300"),
    ("admin CIDR host bits", {"adminCidrs": ["198.51.100.7/24"]}, "adminCidrs", "198.51.100.7/24"),
    ("admin CIDR world-open", {"adminCidrs": ["0.0.0.0/0"]}, "adminCidrs", "0.0.0.0/0"),
    ("network CIDR malformed", {"networkCidr": "10.0.0.0/33"}, "networkCidr", "10.0.0.0/33"),
    ("subnet CIDR malformed", {"subnetCidr": "10.0.1/24x"}, "subnetCidr", "10.0.1/24x"),
    ("subnet outside network", {"subnetCidr": "10.1.1.0/24"}, "subnetCidr", "10.1.1.0/24"),
    (
        "LB private IPs collide",
        {"lbPrivateIps": ["10.0.1.11", "10.0.1.11"]},
        "lbPrivateIps",
        "10.0.1.11",
    ),
    (
        "web IP collides with an LB",
        {"webPrivateIps": ["10.0.1.12", "10.0.1.30"]},
        "webPrivateIps",
        "10.0.1.12",
    ),
    (
        "LB IP outside the subnet",
        {"lbPrivateIps": ["10.0.2.11", "10.0.1.12"]},
        "lbPrivateIps",
        "10.0.2.11",
    ),
    (
        "web IP outside the subnet",
        {"webPrivateIps": ["10.0.1.21", "10.0.9.22"]},
        "webPrivateIps",
        "10.0.9.22",
    ),
    (
        "web IP is the gateway",
        {"webPrivateIps": ["10.0.1.1", "10.0.1.22"]},
        "webPrivateIps",
        "10.0.1.1",
    ),
    ("webCount zero", {"webCount": "0"}, "webCount", "0"),
    ("webCount negative", {"webCount": "-1"}, "webCount", "-1"),
    ("webCount not a number", {"webCount": "two"}, "webCount", "two"),
    ("sshPublicKey missing, private set", {"sshPublicKey": None}, "sshPublicKey", "''"),
    ("sshPublicKey blank", {"sshPublicKey": ""}, "sshPublicKey", "''"),
    ("adminCidrs missing", {"adminCidrs": None}, "adminCidrs", "None"),
    ("adminCidrs empty", {"adminCidrs": []}, "adminCidrs", "[]"),
    ("sshPrivateKey missing", {"sshPrivateKey": None}, "sshPrivateKey", "None"),
    ("sshPrivateKey blank", {"sshPrivateKey": ""}, "sshPrivateKey", "None"),
    ("failoverToken missing", {"failoverToken": None}, "failoverToken", "None"),
    ("failoverToken blank", {"failoverToken": ""}, "failoverToken", "None"),
    ("public key garbage", {"sshPublicKey": "not a key"}, "sshPublicKey", "not a key"),
    (
        "public key bad base64",
        {"sshPublicKey": "ssh-ed25519 AAAA!!notbase64 me@host"},
        "sshPublicKey",
        "AAAA!!notbase64",
    ),
    (
        "public key type mismatch",
        {"sshPublicKey": PUBLIC_KEY.replace("ssh-ed25519", "ssh-rsa", 1)},
        "sshPublicKey",
        "ssh-rsa",
    ),
    (
        "public key is two keys",
        {"sshPublicKey": PUBLIC_KEY + "\n" + ed25519_public_key(9)},
        "sshPublicKey",
        "ssh-ed25519",
    ),
    (
        "private key pasted as public",
        {"sshPublicKey": PRIVATE_KEY},
        "sshPublicKey",
        "private key",
    ),
    # --- patterns are full matches: a trailing newline is not part of a valid value
    ("clusterName trailing newline", {"clusterName": "web\n"}, "clusterName", "web\\n"),
    ("cookieName trailing newline", {"cookieName": "SID\n"}, "cookieName", "SID"),
    ("statsUser trailing newline", {"statsUser": "admin\n"}, "statsUser", "admin"),
    ("statsUser with blank", {"statsUser": "ad min"}, "statsUser", "ad min"),
    ("statsUser with colon", {"statsUser": "ad:min"}, "statsUser", "ad:min"),
    ("healthCheckPath newline", {"healthCheckPath": "/check.txt\n"}, "healthCheckPath", "check"),
    ("healthCheckPath dot-dot", {"healthCheckPath": "/../etc/x"}, "healthCheckPath", ".."),
    ("healthCheckPath dot", {"healthCheckPath": "/./check.txt"}, "healthCheckPath", "/./"),
    ("healthCheckPath blank", {"healthCheckPath": "/a b"}, "healthCheckPath", "/a b"),
    ("healthCheckPath quote", {"healthCheckPath": '/a"b'}, "healthCheckPath", "/a"),
    ("serverType newline", {"serverType": "cx23\n"}, "serverType", "cx23"),
    # --- the failover script's API: https only from stack config
    (
        "API endpoint plain http",
        {"hetznerApiEndpoint": "http://api.hetzner.cloud/v1"},
        "hetznerApiEndpoint",
        "http://",
    ),
    (
        "API endpoint trailing newline",
        {"hetznerApiEndpoint": "https://api.hetzner.cloud/v1\n"},
        "hetznerApiEndpoint",
        "https://",
    ),
    (
        "API endpoint with query",
        {"hetznerApiEndpoint": "https://api.hetzner.cloud/v1?x=1"},
        "hetznerApiEndpoint",
        "x=1",
    ),
    (
        "API endpoint with credentials",
        {"hetznerApiEndpoint": "https://u:p@api.hetzner.cloud/v1"},
        "hetznerApiEndpoint",
        "https://",
    ),
    ("API endpoint ftp", {"hetznerApiEndpoint": "ftp://x/v1"}, "hetznerApiEndpoint", "ftp"),
    # --- secrets that their file cannot carry (never echoed)
    ("statsPassword newline", {"statsPassword": "abc\nuser x"}, "statsPassword", "not shown"),
    ("statsPassword tab", {"statsPassword": "a\tb"}, "statsPassword", "not shown"),
    ("statsPassword too long", {"statsPassword": "x" * 129}, "statsPassword", "not shown"),
    ("statsPassword non-ASCII", {"statsPassword": "pässwort"}, "statsPassword", "not shown"),
    (
        "vrrpPassword too long",
        {"vrrpPassword": "ninechars", "vrrpVersion": "2", "vrrpAdvertInterval": "1"},
        "vrrpPassword",
        "not shown",
    ),
    (
        "vrrpPassword blank inside",
        {"vrrpPassword": "ab cd", "vrrpVersion": "2", "vrrpAdvertInterval": "1"},
        "vrrpPassword",
        "not shown",
    ),
    (
        "vrrpPassword comment char",
        {"vrrpPassword": "ab#cd", "vrrpVersion": "2", "vrrpAdvertInterval": "1"},
        "vrrpPassword",
        "not shown",
    ),
    (
        "vrrpPassword quote",
        {"vrrpPassword": 'ab"cd', "vrrpVersion": "2", "vrrpAdvertInterval": "1"},
        "vrrpPassword",
        "not shown",
    ),
    ("vrrpPassword with VRRPv3", {"vrrpPassword": "abcd1234"}, "vrrpPassword", "VRRPv3"),
    ("failoverToken two lines", {"failoverToken": "a" * 64 + "\nb"}, "failoverToken", "not shown"),
    ("failoverToken with blank", {"failoverToken": "abc def" * 5}, "failoverToken", "not shown"),
    ("failoverToken too short", {"failoverToken": "abc"}, "failoverToken", "not shown"),
    (
        "provider token with colon",
        {"failoverToken": "", "hcloud:token": "x" * 30 + ":y"},
        "hcloud:token",
        "not shown",
    ),
    # --- networks Hetzner refuses once other resources exist
    ("network not RFC 1918", {"networkCidr": "100.64.0.0/16"}, "networkCidr", "100.64"),
    ("network public", {"networkCidr": "8.8.0.0/16"}, "networkCidr", "8.8.0.0"),
    ("network lab range", {"networkCidr": "198.18.0.0/16"}, "networkCidr", "198.18"),
    ("network too small", {"networkCidr": "10.0.1.0/25"}, "networkCidr", "/25"),
    ("network netmask notation", {"networkCidr": "10.0.0.0/255.255.0.0"}, "networkCidr", "255"),
    ("subnet netmask notation", {"subnetCidr": "10.0.1.0/255.255.255.0"}, "subnetCidr", "255"),
    ("network with blank", {"networkCidr": "10.0.0.0/16 "}, "networkCidr", "10.0.0.0"),
    (
        "admin CIDR netmask notation",
        {"adminCidrs": ["198.51.100.0/255.255.255.0"]},
        "adminCidrs",
        "255",
    ),
    ("admin CIDR two halves", {"adminCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "adminCidrs", "whole"),
    (
        "admin CIDRs all but private",
        {
            "adminCidrs": [
                "0.0.0.0/5",
                "8.0.0.0/7",
                "11.0.0.0/8",
                "12.0.0.0/6",
                "16.0.0.0/4",
                "32.0.0.0/3",
                "64.0.0.0/2",
                "128.0.0.0/1",
            ]
        },
        "adminCidrs",
        "whole IPv4",
    ),
    ("admin CIDR IPv6 world", {"adminCidrs": ["198.51.100.7/32", "::/0"]}, "adminCidrs", "IPv6"),
    ("admin CIDR IPv6 halves", {"adminCidrs": ["::/1", "8000::/1"]}, "adminCidrs", "IPv6"),
    ("admin CIDR no prefix", {"adminCidrs": ["198.51.100.7"]}, "adminCidrs", "198.51.100.7"),
    # --- server types Hetzner would refuse after the network exists
    ("serverType unknown", {"serverType": "cx99"}, "serverType", "allowUnlistedServerType"),
    ("serverType not in location", {"location": "ash", "serverType": "cx23"}, "serverType", "ash"),
    ("Arm type not in US", {"location": "hil", "serverType": "cax11"}, "serverType", "hil"),
    ("image not supported", {"image": "ubuntu-24.04"}, "image", "ubuntu"),
    ("autoReboot not a bool", {"autoReboot": "yes"}, "autoReboot", "yes"),
]


@pytest.mark.parametrize(
    ("overrides", "key", "shown"),
    [pytest.param(o, k, v, id=case) for case, o, k, v in BAD_INPUTS],
)
def test_bad_input_fails_naming_the_key_before_any_resource(
    monitor: RecordingMonitor, overrides: dict[str, Any], key: str, shown: str
) -> None:
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    with pytest.raises(SettingsError) as raised:
        run_main()  # the whole program, as `pulumi up` runs it
    err = raised.value
    assert err.key == key
    assert f"'{PROJECT}:{key}'" in str(err)
    assert shown in str(err)
    # Never echo a secret back in an error message.
    assert PRIVATE_KEY.splitlines()[1] not in str(err)
    assert FAILOVER_TOKEN not in str(err)
    for secret_key in SECRET_CONFIG_KEYS | {"hcloud:token"}:
        value = overrides.get(secret_key)
        if value:
            assert value not in str(err), f"{secret_key} echoed in the error"
    assert monitor.registrations == []


def test_the_same_config_without_the_fault_deploys(monitor: RecordingMonitor) -> None:
    """Guards the test above: the base config must not fail on its own."""
    config, secret_keys = valid_config()
    pulumi.runtime.set_all_config(config, secret_keys)
    run_main()
    assert len(monitor.registrations) > 10


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("location", "mars1", "location"),
        ("web_count", 0, "webCount"),
        ("subnet_cidr", "192.168.0.0/24", "subnetCidr"),
        ("admin_cidrs", (), "adminCidrs"),
        ("lb_private_ips", ("10.0.1.11",), "lbPrivateIps"),
        ("web_private_ips", ("10.0.1.21",), "webPrivateIps"),
        ("vrrp_router_id", 0, "vrrpRouterId"),
        ("vrrp_version", 2, "vrrpAdvertInterval"),  # 0.2 s is not a whole second
        ("balance", "random", "balance"),
        ("cluster_name", "Bad_Name", "clusterName"),
    ],
)
def test_settings_built_directly_are_validated_too(field: str, value: Any, key: str) -> None:
    with pytest.raises(SettingsError) as raised:
        make_settings(**{field: value})
    assert raised.value.key == key


def test_lab_only_values_need_the_lab_path() -> None:
    """The lab's http fake API and 198.18/15 addresses pass only with Settings(lab=True),
    which no config key can set."""
    lab_values: dict[str, Any] = {
        "network_cidr": "198.18.0.0/16",
        "subnet_cidr": "198.18.1.0/24",
        "hetzner_api_endpoint": "http://198.19.0.2:8080/v1",
    }
    for field, value in lab_values.items():
        with pytest.raises(SettingsError):
            make_settings(**{field: value})
    assert make_settings(lab=True, **lab_values).lab
    config_attrs = {
        *cfgmod._STR_FIELDS.values(),
        *cfgmod._INT_FIELDS.values(),
        *cfgmod._FLOAT_FIELDS.values(),
        *cfgmod._BOOL_FIELDS.values(),
        *cfgmod._LIST_FIELDS.values(),
    }
    assert "lab" not in config_attrs
    # a stack config that names `lab` is ignored: the http endpoint is still refused
    raw = {**cfgmod.settings_to_config(make_settings()), "lab": "true"}
    raw["hetznerApiEndpoint"] = lab_values["hetzner_api_endpoint"]
    with pytest.raises(SettingsError):
        cfgmod.settings_from_values(raw.get)


def test_unlisted_server_type_can_be_allowed_explicitly() -> None:
    s = make_settings(server_type="cx63", allow_unlisted_server_type=True)
    assert s.server_memory_mib == cfgmod.UNLISTED_MEMORY_MIB
    assert make_settings(location="ash", server_type="cpx21").server_memory_mib == 4096


@pytest.mark.parametrize(
    ("location", "server_type"),
    [("nbg1", "cx23"), ("nbg1", "cpx22"), ("ash", "cpx22"), ("sin", "cpx32"), ("hel1", "cax11")],
)
def test_current_server_types_are_accepted_where_hetzner_offers_them(
    location: str, server_type: str
) -> None:
    assert make_settings(location=location, server_type=server_type).server_type == server_type


def test_settings_are_frozen() -> None:
    s = make_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.web_count = 5  # type: ignore[misc]


# --- Pulumi.yaml and Pulumi.dev.yaml ----------------------------------------------------------


def _project() -> dict[str, Any]:
    project: dict[str, Any] = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    return project


def test_project_file_basics() -> None:
    project = _project()
    assert project["name"] == PROJECT
    assert project["description"]
    assert project["runtime"] == {
        "name": "python",
        "options": {"toolchain": "pip", "virtualenv": ".venv"},
    }


def test_project_declares_every_config_key_with_type_and_description() -> None:
    declared = _project()["config"]
    assert set(declared) == ALL_KEYS
    for key, spec in declared.items():
        assert spec["type"] in ("string", "integer", "boolean", "array"), key
        assert spec.get("description"), key
        if spec["type"] == "array":
            assert spec["items"] == {"type": "string"}, key


def test_project_defaults_match_the_settings_dataclass() -> None:
    declared = _project()["config"]
    attr_of = {
        **cfgmod._STR_FIELDS,
        **cfgmod._INT_FIELDS,
        **cfgmod._FLOAT_FIELDS,
        **cfgmod._BOOL_FIELDS,
        **cfgmod._LIST_FIELDS,
        **cfgmod._BOOL_FIELDS,
    }
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for key, attr in attr_of.items():
        if key in cfgmod.REQUIRED_KEYS:
            continue
        default = defaults[attr]
        declared_default = declared[key]["default"]
        if isinstance(default, tuple):
            assert tuple(declared_default) == default, key
        elif isinstance(default, float):
            assert float(declared_default) == default, key
        else:
            assert declared_default == default, key


def test_required_keys_have_no_default_and_only_they_lack_one() -> None:
    """The CLI treats a typed key without a default as required (and rejects a default on a
    secret key), so exactly the required keys go without one."""
    declared = _project()["config"]
    required = {key for key, spec in declared.items() if "default" not in spec}
    assert required == set(cfgmod.REQUIRED_KEYS) == {"adminCidrs"}
    for key in SECRET_CONFIG_KEYS | {"sshPublicKey"}:
        assert declared[key]["default"] == "", key  # blank = unset, see load_settings


def test_dev_stack_holds_valid_non_secret_settings() -> None:
    stack_file = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    prefix = f"{PROJECT}:"
    values = {k.removeprefix(prefix): v for k, v in stack_file.items()}
    assert all(k.startswith(prefix) for k in stack_file)
    assert not set(values) & SECRET_CONFIG_KEYS  # secrets are never stored in plain text
    assert set(values) <= ALL_KEYS
    settings = cfgmod.settings_from_values(values.get)
    assert settings.admin_cidrs and all(c.startswith("203.0.113.") for c in settings.admin_cidrs)
    text = (ROOT / "Pulumi.dev.yaml").read_text()
    assert "REPLACE" in text


def test_settings_to_config_is_read_back_as_the_same_settings(monitor: RecordingMonitor) -> None:
    """The local cloud tier hands the program a stack config made from Settings."""
    settings = make_settings(
        web_count=3,
        image="debian-12",
        subnet_cidr="10.0.1.0/24",
        lb_private_ips=("10.0.1.5", "10.0.1.6"),
        vrrp_advert_interval=0.3,
        cookie_mode="insert",
    )
    raw = cfgmod.settings_to_config(settings)
    assert set(raw) <= ALL_KEYS
    config, secret_keys = valid_config(**{k: v for k, v in raw.items()})
    pulumi.runtime.set_all_config(config, secret_keys)
    assert run(load_settings).settings == settings


# --- HTTPS settings (issue 11) ---------------------------------------------------------------

_HTTPS_OK = {"domains": ["example.com", "www.example.com"], "acmeEmail": "ops@example.com"}

HTTPS_BAD_INPUTS = [
    ("wildcard domain", {**_HTTPS_OK, "domains": ["*.example.com"]}, "domains", "wildcard"),
    ("domain with scheme", {**_HTTPS_OK, "domains": ["https://example.com"]}, "domains", "https"),
    ("domain uppercase", {**_HTTPS_OK, "domains": ["Example.com"]}, "domains", "Example.com"),
    ("domain one label", {**_HTTPS_OK, "domains": ["localhost"]}, "domains", "localhost"),
    ("domain is an IP", {**_HTTPS_OK, "domains": ["192.0.2.1"]}, "domains", "192.0.2.1"),
    ("domain trailing dot", {**_HTTPS_OK, "domains": ["example.com."]}, "domains", "example"),
    ("domain label dash", {**_HTTPS_OK, "domains": ["-a.example.com"]}, "domains", "-a."),
    ("domain twice", {**_HTTPS_OK, "domains": ["a.example", "a.example"]}, "domains", "once"),
    ("domains without email", {"domains": ["example.com"]}, "acmeEmail", "required"),
    ("email without domain", {**_HTTPS_OK, "acmeEmail": "ops@"}, "acmeEmail", "ops@"),
    ("email no at", {**_HTTPS_OK, "acmeEmail": "ops.example.com"}, "acmeEmail", "ops.example"),
    ("email shell chars", {**_HTTPS_OK, "acmeEmail": "a$(x)@example.com"}, "acmeEmail", "$(x)"),
    (
        "directory http",
        {**_HTTPS_OK, "acmeDirectory": "http://ca.example/dir"},
        "acmeDirectory",
        "http:",
    ),
    ("directory quote", {**_HTTPS_OK, "acmeDirectory": 'https://ca"x/dir'}, "acmeDirectory", "ca"),
    ("domain outside zone", {**_HTTPS_OK, "dnsZone": "example.org"}, "domains", "example.org"),
    (
        "zone lookalike",
        {**_HTTPS_OK, "domains": ["badexample.com"], "dnsZone": "example.com"},
        "domains",
        "badexample",
    ),
    ("zone without domains", {"dnsZone": "example.com"}, "dnsZone", "example.com"),
    ("hsts negative", {**_HTTPS_OK, "hstsMaxAge": "-1"}, "hstsMaxAge", "-1"),
    ("hsts too long", {**_HTTPS_OK, "hstsMaxAge": "999999999"}, "hstsMaxAge", "999999999"),
    ("hsts not a number", {**_HTTPS_OK, "hstsMaxAge": "1y"}, "hstsMaxAge", "1y"),
]


@pytest.mark.parametrize(
    ("overrides", "key", "shown"),
    [pytest.param(o, k, v, id=case) for case, o, k, v in HTTPS_BAD_INPUTS],
)
def test_bad_https_input_fails_naming_the_key_before_any_resource(
    monitor: RecordingMonitor, overrides: dict[str, Any], key: str, shown: str
) -> None:
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    with pytest.raises(SettingsError) as raised:
        run_main()
    assert raised.value.key == key
    assert f"'{PROJECT}:{key}'" in str(raised.value)
    assert shown in str(raised.value)
    assert monitor.registrations == []


def test_good_https_config_loads(monitor: RecordingMonitor) -> None:
    s = load(
        monitor,
        **_HTTPS_OK,
        dnsZone="example.com",
        hstsMaxAge="0",
        acmeDirectory="https://acme-staging-v02.api.letsencrypt.org/directory",
    ).settings
    assert s.domains == ("example.com", "www.example.com")
    assert s.dns_zone == "example.com" and s.hsts_max_age == 0
    assert s.acme_directory.endswith("acme-staging-v02.api.letsencrypt.org/directory")


def test_https_defaults_are_plain_http_with_lets_encrypt_and_a_day_of_hsts(
    monitor: RecordingMonitor,
) -> None:
    s = load(monitor).settings
    assert s.domains == () and s.dns_zone == "" and s.acme_email == ""
    assert s.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert s.hsts_max_age == 86400
