"""Day-2 changes on a running Debian cluster under continuous HTTP and HTTPS traffic:
each one is the program's own resources, diffed against the last deployment and replayed in the
engine's order (lab.cloud.apply.rollout). Each ends with no failed request, never more
than one LB or half the web servers out at once, and the hosts as a fresh deployment
with the new settings would leave them.

The scenarios share one cluster (2 LBs, 3 web servers, room for a fourth) and run in
order: a failed activation then fixed, webCount 3 -> 4 -> 2, a serverType change (a
power cycle per server), an sshPublicKey rotation in two steps, the image debian-12 ->
debian-13 for the whole cluster (every server replaced).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lab.cloud.apply import ApplyResult, Event
from lab.cloud.cluster import CloudCluster
from lab.cloud.rolling import DAY2_SITE, differences_from_fresh, rolling_change

if TYPE_CHECKING:
    from tests.cloud.conftest import Bench

pytestmark = pytest.mark.cloud

IMAGE = "debian-12"
NEW_IMAGE, NEW_VERSION = "debian-13", "13"
#: From the lab's cpx11 (gen 1, 2 GiB) to gen 2 of the same size. A bigger type raises
#: HAProxy's maxconn beyond what a lab host may open: this machine caps every process
#: at 20000 files and the lab cannot raise it (no CAP_SYS_RESOURCE), where a Hetzner
#: VM's systemd allows 524288.
NEW_SERVER_TYPE = "cpx12"


@pytest.fixture(scope="module")
def day2_cluster(cloud_prefix: str, bench: Bench) -> Iterator[CloudCluster]:
    with CloudCluster(IMAGE, web_count=3, spare_webs=1, **DAY2_SITE) as c:
        result = c.apply()
        assert result.ok, result.failure()
        bench.record(
            "first_up_emulated", result.seconds, "s", image=IMAGE, webs=3,
            note="first `pulumi up` replayed on booted hosts (every step over SSH)",
        )  # fmt: skip
        c.wait_settled(60)
        yield c


def change(
    c: CloudCluster, bench: Bench, metric: str, duration: float = 280, **settings: Any
) -> tuple[ApplyResult, list[Event], dict[str, Any]]:
    """One `pulumi up` with `settings` under traffic; the figures are recorded."""
    done = rolling_change(c, duration, **settings)
    bench.record(metric, done.seconds, "s", image=c.image, ok=done.result.ok, **done.figures)
    return done.result, done.events, done.figures


def assert_rolled(c: CloudCluster, result: ApplyResult, figures: dict[str, Any]) -> None:
    assert result.ok, result.failure()
    assert figures["requests"] > 50, figures
    assert figures["https_requests"] > 25, figures  # HTTPS ran through the change too
    # No request fails, except one in flight at the instant the floating IP's route moves
    # (lb1 hands over, and takes it back): its next packets reach the other LB, which
    # knows nothing of the connection. At most one per move and client stream.
    assert figures["failed_not_at_ip_move"] == 0, figures
    assert figures["http_failed_at_ip_move"] <= figures["ip_moves"], figures
    assert figures["https_failed_at_ip_move"] <= figures["ip_moves"], figures
    assert figures["samples"] > 0, figures  # the out-of-service probes ran
    assert figures["most_lbs_out"] <= 1, figures
    assert figures["most_webs_out"] <= max(1, len(c.settings.web_names) // 2), figures  # type: ignore[union-attr]
    assert differences_from_fresh(c) == []


def test_a_failed_activation_runs_again_once_fixed(
    day2_cluster: CloudCluster, bench: Bench
) -> None:
    """HAProxy's reload fails on lb2 (its unit masked: an operator's mistake): the step
    fails after installing the files and the update stops there (lb1 untouched, serving).
    Unmasked, the next `pulumi up` with the same settings activates them."""
    c = day2_cluster
    c.ssh("lb2", "systemctl mask --runtime haproxy")
    try:
        result, _, figures = change(c, bench, "day2_failed_activation", balance="leastconn")
    finally:
        c.ssh("lb2", "systemctl unmask --runtime haproxy")
    assert result.named("failed") == ["hcloud-ha-web-lb2-haproxy"], result.failure()
    assert "activation failed" in result.runs["hcloud-ha-web-lb2-haproxy"].stderr
    assert result.runs["hcloud-ha-web-lb1-haproxy"].status == "not run"
    assert figures["failed_requests"] == 0, figures
    assert "balance leastconn" in c.ssh("lb2", "cat /etc/haproxy/haproxy.cfg")
    assert "balance leastconn" not in c.ssh("lb1", "cat /etc/haproxy/haproxy.cfg")

    result, _, figures = change(c, bench, "day2_failed_activation_fixed", balance="leastconn")
    assert result.runs["hcloud-ha-web-lb2-haproxy"].status == "ran"
    assert "haproxy updated and reloaded" in result.runs["hcloud-ha-web-lb2-haproxy"].stdout
    assert_rolled(c, result, figures)


def test_web_count_up_then_down(day2_cluster: CloudCluster, bench: Bench) -> None:
    c = day2_cluster
    result, events, figures = change(c, bench, "day2_web_count_3_to_4", web_count=4)
    assert any(e.what == "create" and e.name == "hcloud-ha-web-web4" for e in events)
    assert_rolled(c, result, figures)
    result, events, figures = change(c, bench, "day2_web_count_4_to_2", web_count=2)
    deleted = [e.name for e in events if e.what == "delete"]
    assert deleted.index("hcloud-ha-web-web3-serve") < deleted.index("hcloud-ha-web-web3")
    assert "web3" not in c.hosts and "web4" not in c.hosts
    assert_rolled(c, result, figures)


def test_server_type_change_power_cycles_one_turn_at_a_time(
    day2_cluster: CloudCluster, bench: Bench
) -> None:
    """A resize is an in-place update: each server's before_update hook drains it, the
    lab powers it off and on (what Hetzner does), and its serve step takes it back."""
    c = day2_cluster
    result, events, figures = change(c, bench, "day2_server_type", server_type=NEW_SERVER_TYPE)
    assert result.ok, result.failure()
    names = [(e.what, e.name) for e in events]
    for host in c.names:
        hook = names.index(("hook", f"hcloud-ha-web-{host}-drain"))
        assert hook < names.index(("update", f"hcloud-ha-web-{host}")), host
    assert not [e for e in events if e.name.startswith("hcloud-ha-web-") and e.what == "delete"
                and e.name.count("-") == 2]  # fmt: skip
    assert_rolled(c, result, figures)


def _keypair(tmp: Path, name: str) -> tuple[Path, str]:
    key = tmp / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
        check=True,
        timeout=30,
    )
    return key, key.with_suffix(".pub").read_text().strip()


def _login(c: CloudCluster, host: str, key: Path) -> subprocess.CompletedProcess[str]:
    argv = c.hosts[host].ssh_argv("true")
    argv[argv.index("-i") + 1] = str(key)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_ssh_key_rotation_in_two_updates_replaces_no_server(
    day2_cluster: CloudCluster, bench: Bench, tmp_path: Path
) -> None:
    c = day2_cluster
    assert c.cloud is not None
    old_key = tmp_path / "old"
    shutil.copy(c.cloud.key_path, old_key)
    new_key, new_public = _keypair(tmp_path, "new")
    # 1: the new key joins the old one
    result, events, figures = change(
        c, bench, "day2_ssh_key_add", extra_ssh_public_keys=(new_public,)
    )
    assert_rolled(c, result, figures)
    for host in c.names:
        assert _login(c, host, new_key).returncode == 0, host
    # 2: switch to it (its private key becomes the stack's) and drop the old one
    c.cloud.key_path.write_text(new_key.read_text())
    c.cloud.key_path.with_suffix(".pub").write_text(new_public + "\n")
    result, events2, figures = change(
        c, bench, "day2_ssh_key_switch", ssh_public_key=new_public, extra_ssh_public_keys=()
    )
    assert_rolled(c, result, figures)
    servers = {f"hcloud-ha-web-{h}" for h in c.names}
    assert not [e for e in [*events, *events2] if e.name in servers], "no server may change"
    for host in c.names:
        assert _login(c, host, new_key).returncode == 0, host
        refused = _login(c, host, old_key)
        # the probe ran: ssh itself connected, the server refused the key
        assert refused.returncode == 255 and "Permission denied" in refused.stderr, host


def test_new_image_replaces_every_server_one_turn_at_a_time(
    day2_cluster: CloudCluster, bench: Bench
) -> None:
    """The flagship: every server deleted (after handing over) and replaced by a fresh
    host from the new image at the same address, lb2 then lb1, the web servers in waves."""
    c = day2_cluster
    before = {h: c.ssh(h, "cat /etc/machine-id").strip() for h in c.names}
    result, events, figures = change(c, bench, "day2_image", duration=290, image=NEW_IMAGE)
    replaced = {e.name for e in events if e.what == "replace"}
    assert {f"hcloud-ha-web-{h}" for h in c.names} <= replaced
    for host in c.names:
        assert c.ssh(host, "cat /etc/machine-id").strip() != before[host], host
        assert f'VERSION_ID="{NEW_VERSION}"' in c.ssh(host, "cat /etc/os-release"), host
    assert_rolled(c, result, figures)
