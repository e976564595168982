"""HaWebCluster under Pulumi mocks: the resource graph the engine would receive."""

from __future__ import annotations

import base64
import gzip
import inspect
import ipaddress
from collections import Counter
from typing import Any

import pulumi
import pulumi_hcloud as hcloud
import pulumi_random as random
import pytest

from components.cluster import TYPE_TOKEN, HaWebCluster
from tests.conftest import (
    ADMIN_CIDRS,
    FAILOVER_TOKEN,
    PRIVATE_KEY,
    RecordingMonitor,
    find_plaintext,
    is_secret,
    make_stack,
    resolve,
    run,
    run_main,
    valid_config,
)

SERVER = "hcloud:index/server:Server"
NETWORK = "hcloud:index/network:Network"
SUBNET = "hcloud:index/networkSubnet:NetworkSubnet"
PLACEMENT_GROUP = "hcloud:index/placementGroup:PlacementGroup"
FIREWALL = "hcloud:index/firewall:Firewall"
SSH_KEY = "hcloud:index/sshKey:SshKey"
FLOATING_IP = "hcloud:index/floatingIp:FloatingIp"
FIP_ASSIGNMENT = "hcloud:index/floatingIpAssignment:FloatingIpAssignment"
RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"

#: SDK class per type token, to ask the SDK itself which resources take labels.
SDK_CLASSES: dict[str, Any] = {
    SERVER: hcloud.Server,
    NETWORK: hcloud.Network,
    SUBNET: hcloud.NetworkSubnet,
    PLACEMENT_GROUP: hcloud.PlacementGroup,
    FIREWALL: hcloud.Firewall,
    SSH_KEY: hcloud.SshKey,
    FLOATING_IP: hcloud.FloatingIp,
    FIP_ASSIGNMENT: hcloud.FloatingIpAssignment,
    RANDOM_PASSWORD: random.RandomPassword,
}
WORLD = {"0.0.0.0/0", "::/0"}


def build(**kwargs: object) -> HaWebCluster:
    return run(lambda: HaWebCluster("t", make_stack(**kwargs)))  # type: ignore[arg-type]


def servers_by_name(monitor: RecordingMonitor) -> dict[str, dict]:
    return {r.name.removeprefix("t-"): r.inputs for r in monitor.of_type(SERVER)}


def hcloud_id(monitor: RecordingMonitor, name: str) -> int:
    return int(monitor.named(name).id)


# --- resource graph ---------------------------------------------------------------------


@pytest.mark.parametrize(("web_count", "web_groups"), [(2, 1), (1, 1), (10, 1), (12, 2)])
def test_resource_counts_and_types(
    monitor: RecordingMonitor, web_count: int, web_groups: int
) -> None:
    build(web_count=web_count)
    counts = Counter(r.type for r in monitor.registrations)
    expected = {
        TYPE_TOKEN: 1,
        NETWORK: 1,
        SUBNET: 1,
        PLACEMENT_GROUP: 1 + web_groups,
        FIREWALL: 2,
        SSH_KEY: 1,
        SERVER: 2 + web_count,
        FLOATING_IP: 1,
        FIP_ASSIGNMENT: 1,
        RANDOM_PASSWORD: 2,
        # components/identity.py: the settings that cannot roll
        "pulumi-python:dynamic:Resource": 1,
    }
    assert {t: counts[t] for t in expected} == expected
    # Anything else can only be provisioning steps (pulumi-command).
    others = set(counts) - set(expected)
    assert all(t.startswith("command:") for t in others), others


def test_server_names_roles_and_settings(monitor: RecordingMonitor) -> None:
    stack = make_stack(web_count=3, server_type="cx33", image="debian-12", location="hel1")
    run(lambda: HaWebCluster("t", stack))
    servers = servers_by_name(monitor)
    assert sorted(servers) == ["lb1", "lb2", "web1", "web2", "web3"]
    for name, inputs in servers.items():
        assert inputs["serverType"] == "cx33"
        assert inputs["image"] == "debian-12"
        assert inputs["location"] == "hel1"
        assert inputs["labels"]["role"] == ("lb" if name.startswith("lb") else "web")
        assert inputs["publicNets"] == [{"ipv4Enabled": True, "ipv6Enabled": True}]
        assert inputs["sshKeys"] == [monitor.named("t-ssh").id]
        assert "userData" not in inputs


@pytest.mark.parametrize(("location", "zone"), [("nbg1", "eu-central"), ("ash", "us-east")])
def test_every_server_sits_in_the_subnet_at_its_private_ip(
    monitor: RecordingMonitor, location: str, zone: str
) -> None:
    stack = make_stack(
        location=location,
        server_type="cpx21",  # offered in every location (CX is EU only)
        web_count=3,
        network_cidr="10.20.0.0/16",
        subnet_cidr="10.20.5.0/24",
        lb_private_ips=("10.20.5.2", "10.20.5.3"),
        web_private_ips=("10.20.5.100", "10.20.5.101", "10.20.5.102"),
    )
    run(lambda: HaWebCluster("t", stack))
    network = monitor.named("t-net")
    subnet = monitor.named("t-subnet")
    assert network.inputs["ipRange"] == "10.20.0.0/16"
    assert subnet.inputs == {
        "networkId": int(network.id),
        "type": "cloud",
        "networkZone": zone,
        "ipRange": "10.20.5.0/24",
    }
    expected_ips = {
        "lb1": "10.20.5.2",
        "lb2": "10.20.5.3",
        "web1": "10.20.5.100",
        "web2": "10.20.5.101",
        "web3": "10.20.5.102",
    }
    for reg in monitor.of_type(SERVER):
        name = reg.name.removeprefix("t-")
        assert reg.inputs["networks"] == [
            {"subnetId": subnet.id, "ip": expected_ips[name], "aliasIps": []}
        ]
        # The attach needs the subnet, not just the network: the engine must order it first.
        assert subnet.urn in reg.dependencies
        assert ipaddress.ip_address(expected_ips[name]) in ipaddress.ip_network("10.20.5.0/24")


def test_default_private_ips_come_from_the_subnet(monitor: RecordingMonitor) -> None:
    build()
    ips = {n: i["networks"][0]["ip"] for n, i in servers_by_name(monitor).items()}
    assert ips == {"lb1": "10.0.1.11", "lb2": "10.0.1.12", "web1": "10.0.1.21", "web2": "10.0.1.22"}


def test_lbs_and_webs_are_in_spread_placement_groups(monitor: RecordingMonitor) -> None:
    build(web_count=12)
    groups = {int(r.id): r for r in monitor.of_type(PLACEMENT_GROUP)}
    assert all(g.inputs["type"] == "spread" for g in groups.values())
    members: dict[int, list[str]] = {}
    for name, inputs in servers_by_name(monitor).items():
        members.setdefault(inputs["placementGroupId"], []).append(name)
    assert set(members) <= set(groups)
    lb_group = {gid for gid, names in members.items() if "lb1" in names}
    assert len(lb_group) == 1
    assert sorted(members[lb_group.pop()]) == ["lb1", "lb2"]
    web_groups = [names for names in members.values() if "lb1" not in names]
    assert sorted(n for names in web_groups for n in names) == sorted(
        f"web{i}" for i in range(1, 13)
    )
    # Hetzner refuses more than 10 servers in one placement group.
    assert all(len(names) <= 10 for names in members.values())


# --- firewalls ----------------------------------------------------------------------------


def _rules(reg_inputs: dict) -> set[tuple[str, str, str | None, frozenset[str]]]:
    return {
        (r["direction"], r["protocol"], r.get("port"), frozenset(r["sourceIps"]))
        for r in reg_inputs["rules"]
    }


def _firewall_of(monitor: RecordingMonitor, server: str) -> dict:
    ids = servers_by_name(monitor)[server]["firewallIds"]
    assert len(ids) == 1
    return next(r.inputs for r in monitor.of_type(FIREWALL) if int(r.id) == ids[0])


def test_lb_firewall_rules_exactly(monitor: RecordingMonitor) -> None:
    build()
    admins = frozenset(ADMIN_CIDRS)
    expected = {
        ("in", "tcp", "80", frozenset(WORLD)),
        ("in", "tcp", "443", frozenset(WORLD)),
        ("in", "tcp", "22", admins),
        ("in", "icmp", None, frozenset(WORLD)),
    }
    for lb in ("lb1", "lb2"):
        fw = _firewall_of(monitor, lb)
        assert _rules(fw) == expected
        assert len(fw["rules"]) == len(expected)


def test_web_firewall_allows_only_admin_ssh_and_icmp(monitor: RecordingMonitor) -> None:
    build(web_count=3)
    expected = {("in", "tcp", "22", frozenset(ADMIN_CIDRS)), ("in", "icmp", None, frozenset(WORLD))}
    for web in ("web1", "web2", "web3"):
        fw = _firewall_of(monitor, web)
        assert _rules(fw) == expected
        assert len(fw["rules"]) == len(expected)
        assert not any(r.get("port") in ("80", "443") for r in fw["rules"])


def _covers_port(port: str | None, wanted: int) -> bool:
    if port in (None, "any"):
        return True
    low, _, high = port.partition("-")
    return int(low) <= wanted <= int(high or low)


def test_ssh_is_never_open_to_the_world(monitor: RecordingMonitor) -> None:
    build()
    for reg in monitor.of_type(FIREWALL):
        for rule in reg.inputs["rules"]:
            if rule["protocol"] in ("tcp", "udp") and _covers_port(rule.get("port"), 22):
                assert not WORLD & set(rule["sourceIps"]), (reg.name, rule)
                assert set(rule["sourceIps"]) == set(ADMIN_CIDRS)


def test_every_server_has_exactly_its_roles_firewall(monitor: RecordingMonitor) -> None:
    build()
    lb_fw, web_fw = hcloud_id(monitor, "t-lb-fw"), hcloud_id(monitor, "t-web-fw")
    for name, inputs in servers_by_name(monitor).items():
        assert inputs["firewallIds"] == [lb_fw if name.startswith("lb") else web_fw]


# --- floating IP ------------------------------------------------------------------------


def test_floating_ip_in_location_assigned_to_lb1_and_never_moved_back(
    monitor: RecordingMonitor,
) -> None:
    build(location="fsn1")
    fips = monitor.of_type(FLOATING_IP)
    assert len(fips) == 1
    assert fips[0].inputs["type"] == "ipv4"
    assert fips[0].inputs["homeLocation"] == "fsn1"
    assert "serverId" not in fips[0].inputs  # the assignment resource owns that
    (assignment,) = monitor.of_type(FIP_ASSIGNMENT)
    assert assignment.inputs == {
        "floatingIpId": int(fips[0].id),
        "serverId": hcloud_id(monitor, "t-lb1"),
    }
    # What the engine receives: keepalived's later moves are not diffs Pulumi undoes.
    assert "serverId" in assignment.ignore_changes


@pulumi.runtime.test
def test_urls_are_built_on_the_floating_ip(monitor: RecordingMonitor) -> pulumi.Output:
    cluster = HaWebCluster("t", make_stack())

    def check(args: list) -> None:
        fip, site, stats = args
        assert fip == "192.0.2.44"  # the provider's address (from the mock)
        assert site == "http://192.0.2.44/"
        # no domains: the stats page is on each LB's localhost only, reached through SSH
        assert stats.startswith("http://127.0.0.1:8404/haproxy?stats")
        assert "ssh -L 8404:127.0.0.1:8404" in stats
        assert "192.0.2.44" not in stats

    return pulumi.Output.all(cluster.floating_ip, cluster.site_url, cluster.stats_url).apply(check)


@pulumi.runtime.test
def test_per_server_outputs(monitor: RecordingMonitor) -> pulumi.Output:
    cluster = HaWebCluster("t", make_stack(web_count=2))
    names = ["lb1", "lb2", "web1", "web2"]
    assert sorted(cluster.public_ipv4) == sorted(cluster.private_ip) == names
    assert sorted(cluster.server_id) == names

    def check(args: list) -> None:
        public, private, ids = args[:4], args[4:8], args[8:]
        by_name = {r.name.removeprefix("t-"): r for r in monitor.of_type(SERVER)}
        for i, name in enumerate(names):
            assert public[i].startswith("203.0.113.")
            assert private[i] == by_name[name].inputs["networks"][0]["ip"]
            assert ids[i] == int(by_name[name].id)
        assert len(set(public)) == len(names)

    return pulumi.Output.all(
        *(cluster.public_ipv4[n] for n in names),
        *(cluster.private_ip[n] for n in names),
        *(cluster.server_id[n] for n in names),
    ).apply(check)


# --- labels and parenting -----------------------------------------------------------------


def test_labels_on_every_resource_that_takes_them(monitor: RecordingMonitor) -> None:
    build(cluster_name="shop")
    labelled = 0
    for reg in monitor.registrations:
        cls = SDK_CLASSES.get(reg.type)
        if cls is None:
            continue
        takes_labels = "labels" in inspect.signature(cls._internal_init).parameters
        if takes_labels:
            labelled += 1
            assert reg.inputs.get("labels", {}).get("cluster") == "shop", reg.name
            assert reg.inputs["labels"].get("role"), reg.name
        else:
            assert "labels" not in reg.inputs
    assert labelled == 1 + 2 + 2 + 1 + 4 + 1  # network, groups, firewalls, key, servers, fip


def test_children_are_parented_to_the_component(monitor: RecordingMonitor) -> None:
    build()
    (component,) = monitor.of_type(TYPE_TOKEN)
    for reg in monitor.registrations:
        if reg is component:
            continue
        if reg.type in SDK_CLASSES:
            assert reg.parent == component.urn, reg.name
        else:  # provisioning steps may nest, but always under the component
            ancestors = []
            parent = reg.parent
            while parent and parent != component.urn:
                ancestors.append(parent)
                parent = next((r.parent for r in monitor.registrations if r.urn == parent), "")
            assert parent == component.urn, (reg.name, ancestors)


# --- secrets ------------------------------------------------------------------------------


def test_generated_passwords_are_secret_and_vrrp_fits_vrrpv2(monitor: RecordingMonitor) -> None:
    cluster = build()
    stats_gen = monitor.named("t-stats-password").inputs
    vrrp_gen = monitor.named("t-vrrp-password").inputs
    assert stats_gen["length"] >= 16 and stats_gen["special"] is False
    assert vrrp_gen == {"length": 8, "special": False}
    assert is_secret(cluster.stats_password) and is_secret(cluster.vrrp_password)
    vrrp = resolve(cluster.vrrp_password)
    assert len(vrrp) == 8 and vrrp.isalnum()
    assert len(resolve(cluster.stats_password)) == stats_gen["length"]


def test_configured_passwords_are_used_and_nothing_is_generated(
    monitor: RecordingMonitor,
) -> None:
    cluster = build(stats_password="configured-stats", vrrp_password="vrrp1234")
    assert monitor.of_type(RANDOM_PASSWORD) == []
    assert resolve(cluster.stats_password) == "configured-stats"
    assert resolve(cluster.vrrp_password) == "vrrp1234"
    assert is_secret(cluster.stats_password) and is_secret(cluster.vrrp_password)


def test_component_outputs_keep_the_stats_password_secret(monitor: RecordingMonitor) -> None:
    build(stats_password="configured-stats")
    (component,) = monitor.of_type(TYPE_TOKEN)
    registered = monitor.outputs[component.urn]
    assert registered["stats_password"]["4dabf18193072939515e22adb298388d"] == (
        "1b47061264138c4ac30d75fd1eb44270"
    )
    assert find_plaintext(registered, "configured-stats") == []


SECRET_VALUES = {
    "ssh private key": PRIVATE_KEY.splitlines()[1],
    "failover token": FAILOVER_TOKEN,
    "stats password": "statsSecretValue-9f8e7d",
    "vrrp password": "vrrpS3cr",
}


def test_no_secret_appears_in_plain_text_in_any_input(monitor: RecordingMonitor) -> None:
    build(
        stats_password=SECRET_VALUES["stats password"],
        vrrp_password=SECRET_VALUES["vrrp password"],
    )
    assert monitor.registrations
    for reg in monitor.registrations:
        for what, value in SECRET_VALUES.items():
            assert find_plaintext(reg.wire, value) == [], f"{what} in plain text in {reg.name}"


def test_plaintext_finder_sees_leaks_and_respects_secret_wrappers() -> None:
    """The scanner used above must flag a leak (else the test above proves nothing)."""
    wrapped = {
        "4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270",
        "value": "key",
    }
    assert find_plaintext({"a": [{"b": "xx key xx"}]}, "key") == [".a[0].b"]
    assert find_plaintext({"a": wrapped}, "key") == []
    blob = base64.b64encode(gzip.compress(b"stats auth admin:key\n")).decode()
    assert find_plaintext({"stdin": blob}, "key") == [".stdin"]


# --- the program (__main__.py) --------------------------------------------------------------


def test_main_exports_every_output_and_keeps_the_password_secret(
    monitor: RecordingMonitor,
) -> None:
    config, secret_keys = valid_config(webCount="3")
    pulumi.runtime.set_all_config(config, secret_keys)
    exports = run_main()
    assert set(exports) == {
        "floating_ip",
        "site_url",
        "stats_url",
        "dns_records",
        "stats_user",
        "stats_password",
        "public_ipv4",
        "private_ip",
        "server_id",
        "ssh_public_key",
        "ssh_private_key",
    }
    assert is_secret(exports["ssh_private_key"])
    assert resolve(exports["ssh_private_key"]) == PRIVATE_KEY
    names = {"lb1", "lb2", "web1", "web2", "web3"}
    for key in ("public_ipv4", "private_ip", "server_id"):
        assert set(exports[key]) == names
    assert resolve(exports["site_url"]) == "http://192.0.2.44/"
    assert resolve(exports["stats_user"]) == "admin"
    assert is_secret(exports["stats_password"])
    assert not is_secret(exports["floating_ip"])
    assert resolve(exports["private_ip"]["web3"]) == "10.0.1.23"
    (component,) = monitor.of_type(TYPE_TOKEN)
    assert component.name == "hcloud-ha-web"
