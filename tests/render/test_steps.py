"""The remote step scripts themselves, run on this machine against a throw-away root.

A step is the exact shell `pulumi up` sends over SSH, with its stdin payload; only the
Layout root differs, and `systemctl` is a stub that records what would be reloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

from components import render
from components.provision import StepPlan, plan_host
from components.render import ClusterFacts, Layout, RenderSecrets
from tests.render.support import checker_missing, make_settings

pytestmark = pytest.mark.skipif(bool(checker_missing()), reason=checker_missing() or "ok")

FACTS = ClusterFacts("198.19.1.1", 4711, {"lb1": 11, "lb2": 12, "web1": 21, "web2": 22})
SECRETS = RenderSecrets(
    stats_password="s3cret-stats", vrrp_password="vrrp1234", failover_token="hcloud-token-9f3a"
)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH entry whose systemctl only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "systemctl"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/systemctl.log\n')
    stub.chmod(0o755)
    return bin_dir


def run_step(plan: StepPlan, fake_bin: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", plan.script],
        input=plan.stdin,
        env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def haproxy_plan(root: Path, **overrides: object) -> StepPlan:
    settings = make_settings(**overrides)
    plans = plan_host(settings, FACTS, SECRETS, "lb1", Layout(root=str(root)))
    return next(p for p in plans if p.daemon == "haproxy")


def reloads(tmp_path: Path) -> list[str]:
    log = tmp_path / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_step_installs_validated_config_and_reloads_once(tmp_path: Path, fake_bin: Path) -> None:
    root = tmp_path / "root"
    plan = haproxy_plan(root)
    first = run_step(plan, fake_bin)
    assert first.returncode == 0, first.stderr
    live = root / "etc/haproxy/haproxy.cfg"
    assert live.read_text() == plan.files[0].content
    assert oct(live.stat().st_mode & 0o777) == "0o600"
    assert reloads(tmp_path) == ["enable -q haproxy", "reload-or-restart haproxy"]

    second = run_step(plan, fake_bin)
    assert second.returncode == 0, second.stderr
    assert "haproxy unchanged" in second.stdout
    assert len(reloads(tmp_path)) == 2, "an unchanged config must not reload the daemon"


def test_rejected_config_fails_the_step_and_leaves_the_live_file(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    good = haproxy_plan(root)
    assert run_step(good, fake_bin).returncode == 0
    before = (root / "etc/haproxy/haproxy.cfg").read_bytes()

    broken = tmp_path / "templates"
    shutil.copytree(render.TEMPLATE_DIR, broken)
    cfg = broken / "haproxy/haproxy.cfg.j2"
    cfg.write_text(cfg.read_text().replace("timeout connect", "contimeout", 1))
    monkeypatch.setattr(
        render, "_ENV", render._ENV.overlay(loader=jinja2.FileSystemLoader(str(broken)))
    )
    bad = haproxy_plan(root)
    result = run_step(bad, fake_bin)
    assert result.returncode != 0
    assert "contimeout" in result.stderr, "the checker's own output must reach the user"
    assert "running config untouched" in result.stderr
    assert (root / "etc/haproxy/haproxy.cfg").read_bytes() == before
    assert len(reloads(tmp_path)) == 2, "a rejected config must not reload anything"


def test_no_secret_in_step_text_or_output(tmp_path: Path, fake_bin: Path) -> None:
    settings = make_settings()
    for host in ("lb1", "web1"):
        for plan in plan_host(settings, FACTS, SECRETS, host, Layout(root=str(tmp_path / host))):
            for secret in (SECRETS.stats_password, SECRETS.vrrp_password, SECRETS.failover_token):
                assert secret not in plan.script
    result = run_step(haproxy_plan(tmp_path / "root"), fake_bin)
    assert SECRETS.stats_password not in result.stdout + result.stderr


def test_checker_output_is_printed_with_every_secret_masked(
    tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy quotes the line it rejects; the step prints that output with the password
    replaced. The template is broken back to an unquoted `stats auth` line, so a
    password with a quote makes `haproxy -c` fail on exactly that line."""
    broken = tmp_path / "templates"
    shutil.copytree(render.TEMPLATE_DIR, broken)
    cfg = broken / "haproxy/haproxy.cfg.j2"
    text = cfg.read_text()
    quoted = "{{ (stats_user ~ ':' ~ stats_password) | haproxy_quote }}"
    assert quoted in text, "update this test: the stats auth line changed"
    cfg.write_text(text.replace(quoted, "{{ stats_user }}:{{ stats_password }}"))
    monkeypatch.setattr(
        render, "_ENV", render._ENV.overlay(loader=jinja2.FileSystemLoader(str(broken)))
    )
    password = "s3cr3t pa'ss"
    secrets = RenderSecrets(
        stats_password=password, vrrp_password="vrrp1234", failover_token="hcloud-token-9f3a"
    )
    plans = plan_host(make_settings(), FACTS, secrets, "lb1", Layout(root=str(tmp_path / "r")))
    plan = next(p for p in plans if p.daemon == "haproxy")
    assert password not in plan.script
    result = run_step(plan, fake_bin)
    assert result.returncode != 0
    assert "unmatched quote" in result.stderr, "the checker's output must still be shown"
    assert "[secret hidden]" in result.stderr
    assert password not in result.stdout + result.stderr
    assert "pa'ss" not in result.stderr and "s3cr3t" not in result.stderr


def test_generated_and_configured_secrets_are_checked_before_rendering() -> None:
    """A value the file cannot carry fails naming its key, whatever produced it."""
    from components.config import SettingsError

    for kwargs, key in (
        ({"stats_password": "a\nstats auth x:y"}, "statsPassword"),
        ({"vrrp_password": "ninechars"}, "vrrpPassword"),
        ({"failover_token": "tok\nen" * 4}, "failoverToken"),
    ):
        values = {
            "stats_password": "ok",
            "vrrp_password": "vrrp1234",
            "failover_token": "hcloud-token-9f3a",
            **kwargs,
        }
        with pytest.raises(SettingsError) as raised:
            RenderSecrets(**values)
        assert raised.value.key == key
        assert next(iter(kwargs.values())) not in str(raised.value)


def test_triggers_change_when_and_only_when_content_changes(tmp_path: Path) -> None:
    root = Layout(root=str(tmp_path))

    def triggers(**overrides: object) -> dict[str, str]:
        settings = make_settings(**overrides)
        return {
            f"{p.host}-{p.daemon}": p.trigger
            for host in (*settings.lb_names, "web1")
            for p in plan_host(settings, FACTS, SECRETS, host, root)
        }

    base = triggers()
    assert base == triggers(), "rendering twice must give the same triggers"
    changed = {k for k, v in triggers(balance="leastconn").items() if base[k] != v}
    assert changed == {"lb1-haproxy", "lb2-haproxy"}
    changed = {k for k, v in triggers(health_check_path="/ready.txt").items() if base[k] != v}
    assert changed == {"lb1-haproxy", "lb2-haproxy", "web1-apache"}
    changed = {k for k, v in triggers(vrrp_advert_interval=0.5).items() if base[k] != v}
    assert changed == {"lb1-keepalived", "lb2-keepalived"}


def test_failed_activation_runs_again_until_it_succeeds(tmp_path: Path, fake_bin: Path) -> None:
    """Files installed by a run whose reload failed are activated again by the next run,
    though they are unchanged by then; once it worked, nothing reloads any more."""
    broken = tmp_path / "reload-fails"
    stub = fake_bin / "systemctl"
    stub.write_text(
        f'#!/bin/sh\nif [ -e {broken} ] && [ "$1" = reload-or-restart ]; then\n'
        '  echo "reload refused" >&2; exit 1\nfi\n'
        f'echo "$*" >> {tmp_path}/systemctl.log\n'
    )
    root = tmp_path / "root"
    plan = haproxy_plan(root)
    broken.touch()
    first = run_step(plan, fake_bin)
    assert first.returncode != 0
    assert "activation failed" in first.stderr
    assert (root / "etc/haproxy/haproxy.cfg").read_text() == plan.files[0].content
    assert reloads(tmp_path) == ["enable -q haproxy"]

    second = run_step(plan, fake_bin)  # still failing: still pending
    assert second.returncode != 0 and reloads(tmp_path) == ["enable -q haproxy"] * 2

    broken.unlink()
    third = run_step(plan, fake_bin)
    assert third.returncode == 0, third.stderr
    assert "haproxy updated and reloaded" in third.stdout
    assert reloads(tmp_path)[-2:] == ["enable -q haproxy", "reload-or-restart haproxy"]

    fourth = run_step(plan, fake_bin)
    assert fourth.returncode == 0 and "haproxy unchanged" in fourth.stdout
    assert len(reloads(tmp_path)) == 4
