"""Render + check: every rendered file passes the daemon's own checker, with odd settings too.

The checkers are the real binaries (`haproxy -c`, `keepalived -t`, `apache2 -t`), invoked
through the validate commands of the render table, so the test exercises exactly what a
remote step runs before a file goes live. keepalived checks run in a network namespace that
holds the interface the config names, found by the same discovery script the hosts run.
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import jinja2
import pytest

from components import render
from components.config import Settings
from components.render import (
    ClusterFacts,
    Layout,
    RenderSecrets,
    daemons_for,
    interface_facts_script,
    render_host,
    validate_command,
)
from tests.render.support import NetnsHost, checker_missing, make_settings, write_tree

VARIANTS: dict[str, dict[str, object]] = {
    "defaults": {},
    "one-web-server": {"web_count": 1},
    "five-web-servers": {"web_count": 5},
    "insert-cookie": {"cookie_mode": "insert", "cookie_name": "SERVERID"},
    "leastconn": {"balance": "leastconn"},
    "custom-health-path": {"health_check_path": "/health/ready.txt"},
    "lab-subnet": {"lab": True, "network_cidr": "198.18.0.0/16", "subnet_cidr": "198.18.4.0/24"},
    "vrrp-v2-password": {"vrrp_version": 2, "vrrp_advert_interval": 1.0},
}
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
SECRETS = RenderSecrets(
    stats_password="p@ss w0rd:#1", vrrp_password="Vr8pPass", failover_token="t" * 64
)

pytestmark = pytest.mark.skipif(bool(checker_missing()), reason=checker_missing() or "ok")


def facts_for(settings: Settings) -> ClusterFacts:
    names = [*settings.lb_names, *settings.web_names]
    return ClusterFacts("198.19.1.1", 4711, {n: 100 + i for i, n in enumerate(names)})


@pytest.fixture
def host_ns() -> Iterator[NetnsHost]:
    with NetnsHost() as ns:
        yield ns


def check_host(settings: Settings, host: str, ns: NetnsHost, tmp_root: Path) -> None:
    layout = Layout(root=str(tmp_root / "root"))
    facts = facts_for(settings)
    role = "lb" if host in settings.lb_names else "web"
    if role == "lb":
        iface = ns.prepare_private_interface(settings.subnet_cidr, index=10)
        if ipaddress.ip_network(settings.subnet_cidr).subnet_of(LAB_RANGE):
            ns.run(interface_facts_script(settings.subnet_cidr, layout))
        else:  # no address outside the lab range: record the interface as discovery would
            facts_file = Path(layout.root) / "etc/keepalived/interfaces.conf"
            facts_file.parent.mkdir(parents=True, exist_ok=True)
            facts_file.write_text(f"$PRIVATE_IFACE={iface}\n")
    files = render_host(settings, facts, SECRETS, host, layout)
    stage = tmp_root / "stage"
    write_tree(stage, files)
    for daemon in daemons_for(role):
        result = ns.run(validate_command(daemon, layout), env={"STAGE": str(stage)}, check=False)
        assert result.returncode == 0, (
            f"{daemon.name} rejected {host}'s config:\n{result.stdout}{result.stderr}"
        )
        # as a remote step does, put the checked files live before the next step's check
        write_tree(Path("/"), [f for f in files if f.daemon == daemon.name])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_file_passes_its_checker(
    variant: str, host_ns: NetnsHost, tmp_path: Path
) -> None:
    settings = make_settings(**VARIANTS[variant])
    for host in (*settings.lb_names, settings.web_names[-1]):
        shutil.rmtree(tmp_path, ignore_errors=True)
        tmp_path.mkdir()
        check_host(settings, host, host_ns, tmp_path)


BREAKAGES = {
    "haproxy/haproxy.cfg.j2": ("    option redispatch 1\n", "    redispatch 1\n"),
    "keepalived/keepalived.conf.j2": ("    advert_int", "    advert_intervall"),
    "apache2/hcloud-ha-web.conf.j2": ("RemoteIPHeader", "RemoteIPHeaderr"),
}


@pytest.mark.parametrize("template", sorted(BREAKAGES))
def test_a_broken_template_is_rejected_by_its_checker(
    template: str, host_ns: NetnsHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken_dir = tmp_path / "templates"
    shutil.copytree(render.TEMPLATE_DIR, broken_dir)
    old, new = BREAKAGES[template]
    original = (broken_dir / template).read_text()
    assert old in original, f"{template} no longer contains {old!r}; update the breakage"
    (broken_dir / template).write_text(original.replace(old, new, 1))
    monkeypatch.setattr(
        render, "_ENV", render._ENV.overlay(loader=jinja2.FileSystemLoader(str(broken_dir)))
    )
    settings = make_settings()
    host = "web1" if template.startswith("apache2") else "lb1"
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AssertionError, match="rejected"):
        check_host(settings, host, host_ns, work)


def test_rendering_is_strict_about_missing_variables() -> None:
    settings = make_settings()
    env = render._ENV.overlay(loader=jinja2.DictLoader({"t.j2": "{{ not_a_variable }}"}))
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("t.j2").render()
    # and every real file ends with a newline (HAProxy refuses a config without one)
    for f in render_host(settings, facts_for(settings), SECRETS, "lb1"):
        assert f.content.endswith("\n"), f.path


def test_lab_layout_changes_paths_not_behaviour() -> None:
    settings = make_settings()
    facts = facts_for(settings)
    plain = {f.path: f.content for f in render_host(settings, facts, SECRETS, "lb1")}
    lab = render_host(settings, facts, SECRETS, "lb1", Layout(root="/run/lab/lb1"))
    for f in lab:
        assert f.path.startswith("/run/lab/lb1/")
        original = plain[f.path.removeprefix("/run/lab/lb1")]
        assert f.content.replace("/run/lab/lb1", "") == original


def test_discovery_script_finds_the_private_interface_by_subnet(
    host_ns: NetnsHost, tmp_path: Path
) -> None:
    settings = make_settings(lab=True, subnet_cidr="198.18.4.0/24", network_cidr="198.18.0.0/16")
    iface = host_ns.prepare_private_interface(settings.subnet_cidr, index=7, name="enp7s0")
    layout = Layout(root=str(tmp_path))
    host_ns.run(interface_facts_script(settings.subnet_cidr, layout))
    facts = (tmp_path / "etc/keepalived/interfaces.conf").read_text()
    assert facts == f"$PRIVATE_IFACE={iface}\n"
    env = (tmp_path / "etc/hcloud-ha-web/interfaces.env").read_text()
    assert f"PRIVATE_IFACE={iface}\n" in env


def test_discovery_fails_loudly_without_an_interface_in_the_subnet(
    host_ns: NetnsHost, tmp_path: Path
) -> None:
    script = interface_facts_script("198.18.9.0/24", Layout(root=str(tmp_path)))
    fast = script.replace("seq 1 60", "seq 1 1").replace("sleep 2", "true")
    result = host_ns.run(fast, check=False)
    assert result.returncode != 0
    assert "no interface with an address in 198.18.9.0/24" in result.stderr


def test_failover_script_compiles_and_names_this_server() -> None:
    settings = make_settings()
    facts = facts_for(settings)
    for host in settings.lb_names:
        script = next(
            f
            for f in render_host(settings, facts, SECRETS, host)
            if f.path == render.FAILOVER_SCRIPT
        )
        compile(script.content, script.path, "exec")
        assert f"SERVER_ID = {facts.server_ids[host]}\n" in script.content
        assert "FLOATING_IP_ID = 4711\n" in script.content


# --- host hardening: the same checkers decide -------------------------------------------


def _host_files(settings: Settings, host: str, root: Path) -> dict[str, str]:
    layout = Layout(root=str(root))
    return {
        f.path.removeprefix(str(root)): f.content
        for f in render_host(settings, facts_for(settings), SECRETS, host, layout)
    }


def test_every_host_gets_sshd_updates_and_timesync_steps() -> None:
    settings = make_settings()
    for role in ("lb", "web"):
        names = [d.name for d in daemons_for(role)]  # type: ignore[arg-type]
        assert {"sshd", "updates", "timesync"} <= set(names), (role, names)
    for package in ("unattended-upgrades", "openssh-server", "systemd-timesyncd"):
        assert all(package in render.PACKAGES[r] for r in ("lb", "web"))
    assert settings.auto_reboot is False


@pytest.mark.parametrize(
    ("planted", "why"),
    [
        ("PasswordAuthentication yes\n", "an earlier drop-in re-enabling passwords"),
        ("KbdInteractiveAuthentication yes\n", "keyboard-interactive re-enabled"),
    ],
)
def test_sshd_step_checks_what_sshd_would_apply(
    planted: str, why: str, host_ns: NetnsHost, tmp_path: Path
) -> None:
    """sshd -t passes, and sshd -T must show keys-only in effect; a drop-in sorting before
    ours (sshd keeps the first value) would win, so the step refuses it."""
    settings = make_settings()
    root = tmp_path / "root"
    sshd = next(d for d in daemons_for("web") if d.name == "sshd")
    files = [
        f
        for f in render_host(settings, facts_for(settings), SECRETS, "web1", Layout(root=str(root)))
        if f.daemon == "sshd"
    ]
    stage = tmp_path / "stage"
    write_tree(stage, files)
    live = root / "etc/ssh"
    shutil.copytree("/etc/ssh", live, symlinks=True)
    for old in (live / "sshd_config.d").glob("*"):
        old.unlink()
    ok = host_ns.run(validate_command(sshd, Layout(root=str(root))), {"STAGE": str(stage)}, False)
    assert ok.returncode == 0, ok.stderr
    (live / "sshd_config.d/05-planted.conf").write_text(planted)
    bad = host_ns.run(validate_command(sshd, Layout(root=str(root))), {"STAGE": str(stage)}, False)
    assert bad.returncode != 0, why
    assert "sshd would not apply" in bad.stderr


def test_updates_step_allows_the_security_origin_only(host_ns: NetnsHost, tmp_path: Path) -> None:
    root = tmp_path / "root"
    updates = next(d for d in daemons_for("lb") if d.name == "updates")
    settings = make_settings()

    def check(settings: Settings, edit: tuple[str, str] | None = None) -> int:
        shutil.rmtree(tmp_path / "stage", ignore_errors=True)
        files = [
            f
            for f in render_host(
                settings, facts_for(settings), SECRETS, "lb1", Layout(root=str(root))
            )
            if f.daemon == "updates"
        ]
        if edit:
            files = [replace(f, content=f.content.replace(*edit)) for f in files]
        write_tree(tmp_path / "stage", files)
        cmd = validate_command(updates, Layout(root=str(root)))
        return host_ns.run(cmd, {"STAGE": str(tmp_path / "stage")}, False).returncode

    assert check(settings) == 0
    # a pattern beside the security one (say, every stable update) is refused
    extra = ('Debian-Security";\n', 'Debian-Security";\n    "origin=Debian,label=Debian";\n')
    assert check(settings, extra) != 0
    assert check(settings, ('"false";', '"false;')) != 0  # apt-config: syntax error


def test_reboots_are_off_by_default_and_staggered_when_allowed(tmp_path: Path) -> None:
    key = "/etc/apt/apt.conf.d/52hcloud-ha-web-unattended-upgrades"
    off = _host_files(make_settings(), "lb1", tmp_path)[key]
    assert 'Automatic-Reboot "false";' in off
    settings = make_settings(auto_reboot=True, web_count=4)
    times = {}
    for host in (*settings.lb_names, *settings.web_names):
        text = _host_files(settings, host, tmp_path)[key]
        assert 'Automatic-Reboot "true";' in text
        times[host] = text.split('Automatic-Reboot-Time "')[1][:5]
    assert times == {
        "lb1": "02:00", "lb2": "02:30",
        "web1": "03:00", "web2": "03:00", "web3": "03:30", "web4": "03:30",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("server_type", "location", "maxconn"),
    [("cpx11", "nbg1", 8192), ("cx23", "nbg1", 16384), ("cx43", "fsn1", 65536),
     ("ccx63", "ash", 200_000)],
)  # fmt: skip
def test_haproxy_limits_follow_the_server_memory(
    server_type: str, location: str, maxconn: int, host_ns: NetnsHost, tmp_path: Path
) -> None:
    settings = make_settings(server_type=server_type, location=location)
    cfg = _host_files(settings, "lb1", tmp_path)["/etc/haproxy/haproxy.cfg"]
    assert cfg.count(f"    maxconn {maxconn}\n") == 2, "global and per-frontend limit"
    assert "maxconn 150\n" in cfg.split("default-server", 1)[1].split("\n", 1)[0] + "\n"
    check_host(settings, "lb1", host_ns, tmp_path)  # and haproxy -c accepts it
