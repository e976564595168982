"""Day-2 changes as the engine sees them under mocks: replacement order, rolling turns,
hooks, triggers, key rotation and the settings that cannot roll."""

from __future__ import annotations

from typing import Any

import pytest

from components import day2
from components.cluster import HaWebCluster
from components.identity import ClusterIdentityProvider, identity_inputs, refusals
from components.render import DAEMONS, file_targets
from components.rolling import lb_order, rolling_gates, web_waves
from lab.program import (
    SERVER_TYPE,
    Mocks,
    ProviderFacts,
    RecordingMonitor,
    install_mocks,
    reveal,
)
from tests.conftest import STACK, ed25519_public_key, make_settings, make_stack, run

COMMAND = "command:remote:Command"
APACHE = next(d for d in DAEMONS if d.name == "apache")
HOSTS = ("lb1", "lb2", "web1", "web2", "web3", "web4")


def build(monitor: RecordingMonitor, **overrides: Any) -> RecordingMonitor:
    run(lambda: HaWebCluster("t", make_stack(stats_password="statsPw-1", **overrides)))
    return monitor


def deployed_monitor(web_count: int) -> RecordingMonitor:
    """Mocks whose Hetzner already lists the cluster's servers (`hcloud.get_servers`)."""
    hosts = HOSTS[: 2 + web_count]
    facts = ProviderFacts(
        servers={f"t-{h}": (700 + i, f"198.18.7.{10 + i}") for i, h in enumerate(hosts)},
        floating_ip=(4711, "198.19.1.1"),
        deployed=True,
    )
    return install_mocks(Mocks(facts), STACK)


def server_urn(monitor: RecordingMonitor, host: str) -> str:
    return monitor.named(f"t-{host}").urn


def ready_urns(monitor: RecordingMonitor, host: str) -> set[str]:
    return {
        r.urn
        for r in monitor.of_type(COMMAND)
        if r.name == f"t-{host}-ready" or r.name.startswith(f"t-{host}-ready-")
    }


# --- the waves ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "share", "sizes"),
    [(1, 0.5, [1]), (2, 0.5, [1, 1]), (3, 0.5, [1, 1, 1]), (4, 0.5, [2, 2]), (5, 0.4, [2, 2, 1])],
)
def test_web_waves_never_take_more_than_the_share(count: int, share: float, sizes: list) -> None:
    names = [f"web{i}" for i in range(1, count + 1)]
    waves = web_waves(names, share)
    assert [len(w) for w in waves] == sizes
    assert [n for w in waves for n in w] == names


def test_rolling_gates_chain_the_lbs_backup_first_and_the_web_waves() -> None:
    gates = rolling_gates(("lb1", "lb2"), ("web1", "web2", "web3", "web4"), 0.5)
    assert lb_order(("lb1", "lb2")) == ("lb2", "lb1")
    assert gates == {
        "lb2": (),
        "lb1": ("lb2",),
        "web1": (),
        "web2": (),
        "web3": ("web1", "web2"),
        "web4": ("web1", "web2"),
    }


# --- servers: replacement and in-place updates -------------------------------------------


def test_servers_are_deleted_before_their_replacement_and_keep_their_keys(
    monitor: RecordingMonitor,
) -> None:
    build(monitor, web_count=2)
    for server in monitor.of_type(SERVER_TYPE):
        assert server.delete_before_replace, server.name
        assert "sshKeys" in server.ignore_changes, server.name
        hooks = server.hooks.get("before_update", [])
        assert hooks == [f"{server.name}-drain"], server.name
        assert day2.HOOKS[hooks[0]].name == hooks[0]
    assert monitor.named("t-ssh").delete_before_replace


def test_the_resize_hook_drains_the_server_at_its_old_address() -> None:
    ran: list[tuple[str, str]] = []
    settings = make_settings()
    hook = day2.drain_hook("t-web1", "web", settings, lambda a, s: ran.append((a, s)))
    args = day2.pulumi.ResourceHookArgs(
        urn="urn", id="1", name="t-web1", type=SERVER_TYPE, old_outputs={"ipv4Address": "1.2.3.4"}
    )
    hook(args)
    assert ran == [("1.2.3.4", day2.drain_script("web", settings))]
    with pytest.raises(RuntimeError, match="no address"):
        hook(day2.pulumi.ResourceHookArgs(urn="u", id="1", name="t-web1", type=SERVER_TYPE))


def test_every_step_is_triggered_by_its_servers_id_and_only_its_own(
    monitor: RecordingMonitor,
) -> None:
    """The engine replaces (and first deletes) exactly the dependents whose inputs come
    from the replaced server: a server's own steps, never another server's."""
    build(monitor, web_count=2)
    servers = {r.urn: r for r in monitor.of_type(SERVER_TYPE)}
    for step in monitor.of_type(COMMAND):
        host, _, kind = step.name.removeprefix("t-").partition("-")
        own = monitor.named(f"t-{host}")
        assert own.id in reveal(step.inputs["triggers"]), step.name
        assert own.urn in step.property_dependencies["triggers"], step.name
        from_servers = {
            urn for urns in step.property_dependencies.values() for urn in urns if urn in servers
        }
        allowed = {own.urn}
        if kind.startswith("ready-"):  # runs on an LB: its address comes from that LB
            allowed.add(server_urn(monitor, kind.removeprefix("ready-")))
        assert from_servers == allowed, step.name


def test_leaving_hosts_hand_over_in_their_serve_steps_delete(monitor: RecordingMonitor) -> None:
    settings = make_settings(web_count=2)
    build(monitor, web_count=2)
    for host, role in (("lb1", "lb"), ("web2", "web")):
        serve = monitor.named(f"t-{host}-serve")
        assert serve.inputs["delete"] == day2.drain_script(role, settings)
        assert serve.inputs["create"] == day2.undrain_script(role, settings)
        # re-created around a resize: drained, then taken back
        assert serve.delete_before_replace
        assert settings.server_type in serve.inputs["triggers"]
    assert "systemctl disable -q --now keepalived" in day2.drain_script("lb", settings)
    check = next(t.path for t in file_targets(settings, APACHE) if t.path.endswith("check.txt"))
    assert f"mv -f {check} {check}.drained" in day2.drain_script("web", settings)


def test_a_first_deployment_creates_every_server_at_once(monitor: RecordingMonitor) -> None:
    build(monitor, web_count=4)
    commands = {r.urn for r in monitor.of_type(COMMAND)}
    for server in monitor.of_type(SERVER_TYPE):
        assert not commands & set(server.dependencies), server.name


def test_a_deployed_cluster_changes_one_turn_at_a_time() -> None:
    monitor = build(deployed_monitor(4), web_count=4)
    commands = {r.urn for r in monitor.of_type(COMMAND)}

    def waits_for(host: str) -> set[str]:
        return set(monitor.named(f"t-{host}").dependencies) & commands

    assert waits_for("lb2") == set()
    assert waits_for("lb1") == ready_urns(monitor, "lb2")
    assert waits_for("web1") == waits_for("web2") == set()
    assert (
        waits_for("web3")
        == waits_for("web4")
        == (ready_urns(monitor, "web1") | ready_urns(monitor, "web2"))
    )
    # a web server's turn ends when it is UP in both LBs' HAProxy
    names = {r.urn: r.name for r in monitor.of_type(COMMAND)}
    assert {names[u] for u in ready_urns(monitor, "web1")} == {
        "t-web1-ready-lb1",
        "t-web1-ready-lb2",
    }


# --- SSH keys ----------------------------------------------------------------------------


def test_keys_rotate_through_a_step_not_through_the_servers(monitor: RecordingMonitor) -> None:
    new = ed25519_public_key(seed=9, comment="new@example")
    build(monitor, web_count=1)
    before = {r.name: r.inputs for r in monitor.of_type(COMMAND)}
    servers = {r.name: r.inputs for r in monitor.of_type(SERVER_TYPE)}
    monitor.registrations.clear()
    build(monitor, web_count=1, extra_ssh_public_keys=(new,))
    after = {r.name: r.inputs for r in monitor.of_type(COMMAND)}
    assert {n for n in after if after[n] != before[n]} == {
        f"t-{h}-keys" for h in ("lb1", "lb2", "web1")
    }
    keys = after["t-web1-keys"]["stdin"].splitlines()
    assert keys == [make_settings().ssh_public_key, new]
    # the servers' own key list changes with sshPublicKey, but they ignore it
    assert {r.name: r.inputs for r in monitor.of_type(SERVER_TYPE)} == servers


# --- what cannot roll --------------------------------------------------------------------


def test_settings_that_cannot_roll_are_refused_with_the_way_out() -> None:
    old = identity_inputs(make_settings())
    assert refusals({}, old) == []  # first deployment
    assert refusals(old, identity_inputs(make_settings(web_count=5))) == []
    for key, change in (
        ("location", {"location": "hel1"}),
        ("networkCidr", {"network_cidr": "10.1.0.0/16", "subnet_cidr": "10.1.1.0/24"}),
        ("clusterName", {"cluster_name": "other"}),
    ):
        failures = refusals(old, identity_inputs(make_settings(**change)))
        assert [f.property for f in failures] == [key]
        assert "new stack" in failures[0].reason and "allowDisruptiveChanges" in failures[0].reason
        overridden = identity_inputs(make_settings(allow_disruptive_changes=True, **change))
        assert refusals(old, overridden) == []
    checked = ClusterIdentityProvider().check(old, identity_inputs(make_settings(location="hel1")))
    assert checked.failures and checked.inputs["location"] == "hel1"


def test_nothing_changes_before_the_identity_check(monitor: RecordingMonitor) -> None:
    build(monitor, web_count=1)
    identity = monitor.named("t-identity").urn
    for r in monitor.registrations:
        if r.type.startswith("hcloud:") and r.type != "hcloud:index/networkSubnet:NetworkSubnet":
            waits = set(r.dependencies)
            # directly, or through the network/ssh key/firewall they are built on
            assert identity in waits or waits & {
                monitor.named(n).urn for n in ("t-net", "t-ssh", "t-fip", "t-lb1")
            }, r.name
