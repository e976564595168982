"""Local cloud, end to end: the program's own remote steps provision booted Debian hosts.

Per image (Debian 13, the default, and Debian 12) one `CloudCluster` is booted in the lab
topology: lb1, lb2, web1, web2 as systemd-nspawn hosts, each in its server's namespace,
the fake Hetzner API beside them. The steps come from running `__main__.py` under Pulumi
mocks whose servers are these hosts, and run over SSH in dependency order. Then, with
systemd running every daemon: the lab scenarios, a re-run, a one-template change, an
invalid template, and a reboot.

Benchmarks (JSON lines, printed at the end): booted -> provisioned, one-template change,
reboot -> serving, peak memory per host.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import pytest

from components import render
from components.provision import PENDING_DIR
from lab.cloud.apply import ApplyResult, changed
from lab.cloud.cluster import CloudCluster
from lab.cluster import assign_calls, wait_for
from lab.scenarios import (
    check_lb_failover,
    check_round_robin,
    check_sticky,
    check_web_server_loss,
)
from lab.topology import FLOATING_IP, LB_NAMES, PUBLIC_IFACE
from lab.traffic import TrafficStream, outage

if TYPE_CHECKING:
    from tests.cloud.conftest import Bench

pytestmark = pytest.mark.cloud

IMAGES = ("debian-13", "debian-12")
HAPROXY_TEMPLATE = "haproxy/haproxy.cfg.j2"
HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
UNITS_BY_ROLE = {"lb": ("haproxy", "hcloud-haproxy-watch", "keepalived"), "web": ("apache2",)}
#: without siteDir a web server's site step switches to the placeholder release
SITE_STEPS = {"lb": (), "web": ("site",)}
#: systemd's own journal lines when it (re)starts or reloads a unit
LIFECYCLE_WORDS = ("Reloading", "Starting", "Stopping", "Started", "Reloaded")


@pytest.fixture(scope="module", params=IMAGES)
def provisioned(
    request: pytest.FixtureRequest, cloud_prefix: str, bench: Bench
) -> Iterator[tuple[CloudCluster, ApplyResult]]:
    image: str = request.param
    with CloudCluster(image) as c:
        for name, t in c.boot_timings.items():
            bench.record("boot_to_ssh", t.ssh_ready, "s", host=name, image=image)
        t0 = time.monotonic()
        result = c.apply()
        assert result.ok, result.failure()
        c.wait_settled(60)
        bench.record(
            "booted_to_provisioned",
            time.monotonic() - t0,
            "s",
            image=image,
            steps=len(result.runs),
            apply_s=round(result.seconds, 2),
            mirror_requests=c.cloud.proxy.stats["requests"] if c.cloud else None,
            mirror_cache_hits=c.cloud.proxy.stats["cache_hits"] if c.cloud else None,
            note="every step over SSH, apt from the Debian mirror, until lb1 is master "
            "with the IP and both webs are UP",
        )
        for name, host in c.hosts.items():
            m = host.memory()
            anon = m.get("cgroup_anon_bytes", m["pss_sum_bytes"])
            bench.record("memory_provisioned_idle", anon / 2**20, "MiB", host=name, image=image)
        yield c, result
        for name, peak in c.memory_peaks().items():
            bench.record("memory_peak_per_host", peak / 2**20, "MiB", host=name, image=image)


@pytest.fixture
def cluster(provisioned: tuple[CloudCluster, ApplyResult]) -> Iterator[CloudCluster]:
    """The module's cluster, settled before and after each test."""
    c = provisioned[0]
    c.wait_settled(30)
    yield c
    c.wait_settled(60)


def role(name: str) -> str:
    return "lb" if name in LB_NAMES else "web"


def lifecycle_lines(c: CloudCluster, name: str, since: float) -> list[str]:
    """systemd start/stop/reload lines of the daemons of ``name`` since ``since`` (epoch)."""
    units = " ".join(f"-u {u}" for u in UNITS_BY_ROLE[role(name)])
    # The whole journal of the units, filtered here: it always holds their first start, so
    # an empty answer means the read failed, never "nothing happened since".
    out = c.ssh(name, f"journalctl -q --no-pager -o short-unix {units}")
    assert out.strip(), f"{name}: no journal at all for {units}: the read did not work"
    lines = []
    for entry in out.splitlines():
        stamp, _, rest = entry.partition(" ")
        message = rest.split(": ", 1)[-1]
        if float(stamp) >= since and message.startswith(LIFECYCLE_WORDS):
            lines.append(message)
    return lines


def file_digest(c: CloudCluster, name: str, path: str) -> str:
    return c.ssh(name, f"sha256sum {path}").split()[0]


@contextlib.contextmanager
def edited_templates(
    edit: Callable[[str], str], template: str = HAPROXY_TEMPLATE
) -> Iterator[None]:
    """Render from a copy of templates/ with ``template`` edited, as a commit changing
    that template would; the program itself is unchanged."""
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        shutil.copytree(render.TEMPLATE_DIR, tmp, dirs_exist_ok=True)
        target = tmp / template
        original = target.read_text()
        edited = edit(original)
        assert edited != original, "the edit changed nothing"
        target.write_text(edited)
        env = render._ENV  # the one Jinja2 environment the program renders with
        loader = env.loader
        env.loader = jinja2.FileSystemLoader(str(tmp))
        try:
            yield
        finally:
            env.loader = loader


def add_to_backend(line: str) -> Callable[[str], str]:
    # The `web` backend is rendered with and without `domains` (the frontends differ).
    anchor = "backend web\n    balance {{ balance }}\n"

    def edit(text: str) -> str:
        assert anchor in text
        return text.replace(anchor, anchor + f"    {line}\n", 1)

    return edit


def response_headers(c: CloudCluster) -> str:
    r = c.lab.client.run(["curl", "-sS", "-m", "3", "-D", "-", "-o", "/dev/null", c.url])
    status = r.stdout.split("\r\n", 1)[0]
    # A header's absence only means something on a real answer from the site.
    assert status.split()[1:2] == ["200"], f"site answered {status!r}"
    return r.stdout


# -- provisioning ------------------------------------------------------------------------
def test_program_steps_provision_every_host(
    provisioned: tuple[CloudCluster, ApplyResult],
) -> None:
    c, result = provisioned
    assert c.settings is not None
    steps = c.applied
    hosts = {n: role(n) for n in c.names}
    # keys and base first, a step per daemon, the site; `serve` takes the host into
    # service; readiness: an LB checks itself, a web server is checked on each LB
    ready = {"lb": ("ready",), "web": tuple(f"ready-{lb}" for lb in LB_NAMES)}
    expected = {
        f"{c.settings.cluster_name}-{h}-{d}"
        for h, r in hosts.items()
        for d in (
            "keys", "base", *(x.name for x in render.daemons_for(r)), *SITE_STEPS[r],
            "serve", *ready[r],
        )
    }  # fmt: skip
    assert set(result.runs) == expected
    assert result.named("ran") == list(result.runs), result.runs
    for name, run in result.runs.items():  # dependency order was kept
        for before in steps[name].after:
            assert result.runs[before].finished <= run.started, f"{name} began before {before}"
    # ... and independent steps overlapped: the four base steps ran side by side
    bases = [r for n, r in result.runs.items() if n.endswith("-base")]
    assert max(r.started for r in bases) < min(r.finished for r in bases)
    # packages came from the Debian mirror, through the lab's proxy (the hosts' only way out)
    assert c.cloud is not None and c.cloud.proxy.stats["requests"] > 0
    for name in c.names:
        packages = render.PACKAGES[role(name)]
        status = c.ssh(
            name, "dpkg-query -W -f '${Package} ${db:Status-Status}\\n' " + " ".join(packages)
        )
        assert sorted(status.split("\n")[:-1]) == sorted(f"{p} installed" for p in packages)
        for unit in UNITS_BY_ROLE[role(name)]:
            state = c.ssh(name, f"systemctl is-active {unit}; systemctl is-enabled {unit}")
            assert state.split() == ["active", "enabled"], (name, unit, state)
    for lb in LB_NAMES:
        assert c.ssh(lb, "systemctl is-active hcloud-floating-ip").strip() == "active"
        shown = c.lab[lb].ip("-4", "-o", "addr", "show", "dev", PUBLIC_IFACE)
        assert f" {FLOATING_IP}/32 " in shown, f"{lb}: the floating IP is not on {PUBLIC_IFACE}"


def test_hosts_are_hardened_by_their_steps(cluster: CloudCluster) -> None:
    """sshd keys only (sshd -t passes), security-only unattended upgrades with their
    timers, timesyncd enabled with our servers, HAProxy chrooted and still logging."""
    for name in cluster.names:
        effective = cluster.ssh(name, "sshd -t && sshd -T -C user=root,host=x,addr=192.0.2.1")
        for want in ("passwordauthentication no", "kbdinteractiveauthentication no"):
            assert want in effective.splitlines(), (name, want)
        apt = cluster.ssh(name, "apt-config dump Unattended-Upgrade")
        origins = [ln for ln in apt.splitlines() if ln.startswith("Unattended-Upgrade::Origins")]
        assert len(origins) == 2 and "security" in origins[1], (name, origins)  # "" + one
        assert 'Unattended-Upgrade::Automatic-Reboot "false";' in apt
        periodic = cluster.ssh(name, "apt-config dump APT::Periodic")
        assert 'APT::Periodic::Unattended-Upgrade "1";' in periodic
        # what unattended-upgrade itself will do (it prints the origins it allows)
        dry = cluster.ssh(name, "unattended-upgrade --dry-run -v 2>&1 | head -5", timeout=120)
        allowed = next(ln for ln in dry.splitlines() if ln.startswith("Allowed origins are:"))
        assert "-security,label=Debian-Security" in allowed, (name, allowed)
        assert allowed.count("origin=") == 1, (name, allowed)
        # Not checked here: apt-daily(-upgrade).timer, which Debian's apt enables; the
        # lab's rootfs masks them so they cannot take the dpkg lock during a test run.
        sync = cluster.ssh(
            name,
            "systemctl is-enabled systemd-timesyncd;"
            " systemd-analyze cat-config systemd/timesyncd.conf | grep '^NTP='",
        )
        assert sync.split("\n")[0] == "enabled" and "ntp1.hetzner.de" in sync, (name, sync)
    for lb in LB_NAMES:
        root = cluster.ssh(
            lb,
            "for p in $(pgrep -x haproxy); do readlink /proc/$p/root; done | sort | uniq -c",
        )
        assert "/var/lib/haproxy" in root, (lb, root)  # the worker
    # the master serves: its access log still reaches the journal from inside the chroot
    since = int(time.time()) - 1
    assert cluster.get()["ok"]
    journal = "journalctl -q -t haproxy --since @" + str(since)
    wait_for(
        lambda: "GET / HTTP/1.1" in cluster.ssh("lb1", journal),
        10,
        "lb1: HAProxy's access log line in the journal",
    )


# -- the lab scenarios, with systemd running the daemons ---------------------------------
def test_round_robin_across_web_servers(cluster: CloudCluster) -> None:
    check_round_robin(cluster)


def test_cookie_stickiness(cluster: CloudCluster) -> None:
    assert cluster.settings is not None
    check_sticky(cluster, cluster.settings.cookie_mode)


def test_web_server_failure_fails_no_request(cluster: CloudCluster) -> None:
    check_web_server_loss(
        cluster,
        fail=lambda: cluster.stop_unit("web1", "apache2"),
        recover=lambda: cluster.start_unit("web1", "apache2"),
    )


def test_lb_failover_through_the_api(cluster: CloudCluster, bench: Bench) -> None:
    """systemd stops lb1's HAProxy: lb2 takes the IP through the API; once HAProxy is
    started again, lb1 (higher priority) takes it back."""
    gap = check_lb_failover(
        cluster,
        fail=lambda: cluster.stop_unit("lb1", "haproxy"),
        recover=lambda: cluster.start_unit("lb1", "haproxy"),
    )
    bench.record(
        "failover_haproxy_stopped",
        gap.gap,
        "s",
        image=cluster.image,
        failed_requests=gap.failed,
        note="last answer before `systemctl stop haproxy` on lb1 -> first answer via lb2",
    )


def test_haproxy_crash_is_repaired_by_systemd(cluster: CloudCluster, bench: Bench) -> None:
    """SIGKILL to lb1's HAProxy: systemd restarts it (Debian's unit says Restart=always),
    clients are served again within seconds, and the cluster settles with lb1 master.
    The HAProxy watcher saw the death and waited for the restart systemd had pending:
    no failover, the floating IP never moved."""
    pid = cluster.main_pids("lb1")["haproxy"]
    stream = TrafficStream(cluster.lab.client, cluster.url, duration=60)
    try:
        stream.wait_started()
        time.sleep(0.3)
        t0 = time.time()
        cluster.kill_unit("lb1", "haproxy")
        wait_for(
            lambda: cluster.main_pids("lb1")["haproxy"] not in (0, pid),
            10,
            "systemd to restart HAProxy on lb1",
            step=0.1,
        )
        cluster.wait_settled(30)
        time.sleep(0.5)
    finally:
        records = stream.stop()
    gap = outage(records, t0)
    assert gap.recovered and gap.gap < 5.0, gap
    assert records[-1]["ok"]
    moved = [p for p in assign_calls(cluster.api_calls(t0)) if p["status"] == 201]
    watch = cluster.ssh("lb1", "journalctl -q --no-pager -o cat -u hcloud-haproxy-watch")
    assert "answered again after" in watch, watch  # the watcher saw HAProxy die
    assert moved == [], moved  # ... and it was no reason to fail over
    assert cluster.masters() == ["lb1"]
    bench.record(
        "haproxy_crash_outage",
        gap.gap,
        "s",
        image=cluster.image,
        failed_requests=gap.failed,
        floating_ip_moves=len(moved),
        note="SIGKILL to lb1's HAProxy under systemd; last answer before -> first after",
    )


# -- re-running, changing, breaking ------------------------------------------------------
def test_rerun_changes_nothing(cluster: CloudCluster) -> None:
    again = cluster.plan()
    assert changed(again, cluster.applied) == set(), "same program, same inputs: nothing to do"
    pids = {n: cluster.main_pids(n) for n in cluster.names}
    digests = {lb: file_digest(cluster, lb, HAPROXY_CFG) for lb in LB_NAMES}
    since = time.time()
    result = cluster.apply(again, force=True)  # every step once more, as on a replace
    assert result.ok, result.failure()
    assert result.named("ran") == list(result.runs)
    daemon_steps = tuple(f"-{d.name}" for d in render.DAEMONS)
    for name, run in result.runs.items():
        if name.endswith(daemon_steps):
            assert "unchanged" in run.stdout, (name, run.stdout)
    for name in cluster.names:
        assert cluster.main_pids(name) == pids[name], f"{name}: a daemon was restarted"
        assert lifecycle_lines(cluster, name, since) == [], f"{name}: a daemon was reloaded"
    assert {lb: file_digest(cluster, lb, HAPROXY_CFG) for lb in LB_NAMES} == digests


def test_one_template_change_reloads_only_its_daemon(cluster: CloudCluster, bench: Bench) -> None:
    header = "X-Hcloud-Ha-Web-Revision"
    pids = {n: cluster.main_pids(n) for n in cluster.names}
    before = dict(cluster.applied)
    with edited_templates(add_to_backend(f"http-response set-header {header} template-change")):
        planned = cluster.plan_all()
    touched = changed(planned[0], before)
    # the two HAProxy steps, and the LBs' readiness checks after them
    assert touched == {
        f"{cluster.settings.cluster_name}-{lb}-{step}"
        for lb in LB_NAMES
        for step in ("haproxy", "ready")
    }
    stream = TrafficStream(cluster.lab.client, cluster.url, duration=60, timeout=5.0)
    try:
        stream.wait_started()
        time.sleep(0.5)
        since = time.time()
        t0 = time.monotonic()
        # a deployed cluster: the engine's order (lb2's turn, then lb1's)
        result, _ = cluster.update(planned)
        took = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        records = stream.stop()
    assert result.ok, result.failure()
    assert set(result.named("ran")) == touched
    bench.record("template_change_apply", took, "s", image=cluster.image, steps=len(touched))
    failed = [r for r in records if not r["ok"]]
    assert not failed, failed[:5]
    assert len(records) > 20
    assert f"{header.lower()}: template-change" in response_headers(cluster).lower()
    for name in cluster.names:
        assert cluster.main_pids(name) == pids[name], f"{name}: restarted instead of reloaded"
        lines = lifecycle_lines(cluster, name, since)
        if name in LB_NAMES:
            assert any(ln.startswith("Reloaded") and "HAProxy" in ln for ln in lines), lines
            assert not any("eepalive" in ln for ln in lines), lines
        else:
            assert lines == [], f"{name}: {lines}"
    # and back: the original template is one more change of the same two steps
    back, _ = cluster.update()
    assert back.ok and set(back.named("ran")) == touched, back.runs
    assert header.lower() not in response_headers(cluster).lower()


def _worker_pid(c: CloudCluster, lb: str) -> str:
    """PID of the HAProxy worker answering the runtime API (`show info`)."""
    info = c.haproxy_command(lb, "show info")
    return next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Pid:"))


def test_a_server_taken_out_stays_out_through_a_reload(cluster: CloudCluster) -> None:
    """The HAProxy step saves the servers' states before its reload and the new process
    loads them: a web server an operator put in maintenance stays out of rotation in the
    new worker, instead of coming back READY and taking requests. (A server DOWN by its
    checks is DOWN again within a check here, so the admin state is what tells.)"""
    assert cluster.settings is not None
    lb, step = "lb1", cluster.plan()[f"{cluster.settings.cluster_name}-lb1-haproxy"]
    cluster.haproxy_command(lb, "disable server web/web1")
    try:
        assert cluster.server_status(lb)["web1"].startswith("MAINT")
        # The step exactly as provisioning runs it, made to activate (reload) although its
        # files are unchanged, as after a failed activation.
        cluster.ssh(lb, "mkdir -p -m 700 /root/reload-test && cat > /root/reload-test/stdin",
                    stdin=step.stdin)  # fmt: skip
        cluster.ssh(lb, "cat > /root/reload-test/step", stdin=step.create)
        cluster.ssh(lb, f"printf '%s\\n' /etc/haproxy/haproxy.cfg > {PENDING_DIR}/pending-haproxy")
        pids, worker = cluster.main_pids(lb), _worker_pid(cluster, lb)
        out = cluster.ssh(lb, "sh /root/reload-test/step < /root/reload-test/stdin")
        assert "haproxy updated and reloaded" in out, out
        assert cluster.main_pids(lb) == pids, "reloaded, not restarted"
        # the reload signal returns at once: ask only the new worker
        wait_for(lambda: _worker_pid(cluster, lb) != worker, 10, "the new HAProxy worker")
        states = cluster.haproxy_command(lb, "show servers state web")
        admin = {f[3]: f[6] for f in (ln.split() for ln in states.splitlines())
                 if len(f) > 6 and f[1] == "web"}  # fmt: skip
        # srv_admin_state: 1 forced maintenance, 0 ready; web2 is listed, so the probe ran
        assert admin.get("web2") == "0", states
        assert admin.get("web1") == "1", states
        assert cluster.server_status(lb)["web1"].startswith("MAINT")
    finally:
        # The saved file would bring web1's maintenance back at HAProxy's next start (a
        # known gap: the file should only serve the reload it was saved for).
        cluster.ssh(lb, f"rm -rf /root/reload-test {PENDING_DIR}/pending-haproxy "
                        f"{render.HAPROXY_STATE_FILE}")  # fmt: skip
        cluster.haproxy_command(lb, "enable server web/web1")
        wait_for(lambda: all(cluster.server_status(x)["web1"].startswith("UP") for x in LB_NAMES),
                 15, "web1 UP again")  # fmt: skip


def test_invalid_config_fails_its_step_and_the_service_keeps_serving(
    cluster: CloudCluster,
) -> None:
    pids = {lb: cluster.main_pids(lb) for lb in LB_NAMES}
    digests = {lb: file_digest(cluster, lb, HAPROXY_CFG) for lb in LB_NAMES}
    with edited_templates(add_to_backend("this-is-not-a-directive on")):
        planned = cluster.plan_all()
    stream = TrafficStream(cluster.lab.client, cluster.url, duration=60, timeout=5.0)
    try:
        stream.wait_started()
        # a deployed cluster changes lb2 (the backup) first, then lb1 (engine order)
        result, _ = cluster.update(planned)
        time.sleep(1.0)
    finally:
        records = stream.stop()
    name = f"{cluster.settings.cluster_name}-%s-haproxy"
    first, second = result.runs[name % "lb2"], result.runs[name % "lb1"]
    assert first.status == "failed" and first.returncode == 1, first
    assert "this-is-not-a-directive" in first.stderr, first.stderr
    assert "config rejected on lb2; running config untouched" in first.stderr
    assert second.status == "not run", "lb1 must not get a config lb2 rejected"
    assert not [r for r in records if not r["ok"]], "requests failed during the broken apply"
    for lb in LB_NAMES:
        assert file_digest(cluster, lb, HAPROXY_CFG) == digests[lb]
        assert cluster.main_pids(lb) == pids[lb]
        assert cluster.running(lb, "haproxy")
    assert cluster.get()["ok"]
    # the failed step is not recorded as applied: the fixed program has nothing left to do
    assert changed(cluster.plan(), cluster.applied) == set()


# -- reboot ------------------------------------------------------------------------------
def test_reboot_comes_back_with_floating_ip_and_services(
    cluster: CloudCluster, bench: Bench
) -> None:
    stream = TrafficStream(cluster.lab.client, cluster.url, duration=120, timeout=2.0)
    try:
        stream.wait_started()
        time.sleep(0.3)
        t0 = time.time()
        cluster.power_off("lb1")
        cluster.wait_owner("lb2", timeout=15)
        moved = time.time()
        # Answered through lb2. (Not stream.wait_recovered: when the IP moves within a
        # second, a client's SYN retransmission reaches lb2 and no request fails at all.)
        wait_for(
            lambda: any(r["ok"] and r["ts"] > moved + 0.2 for r in stream.records()),
            15,
            "clients answered through lb2",
        )
        # the power cycle took the address with it
        assert f" {FLOATING_IP}/32 " not in cluster.lab["lb1"].ip("-4", "-o", "addr", "show")
        t1 = time.monotonic()
        timing = cluster.power_on("lb1")
        cluster.wait_active("lb1")
        cluster.wait_settled(60)
        back = time.monotonic() - t1
    finally:
        records = stream.stop()
    bench.record(
        "reboot_to_serving",
        back,
        "s",
        image=cluster.image,
        host="lb1",
        boot_s=round(timing.system_ready, 2),
        note="container start -> lb1 master again with the IP, both webs UP",
    )
    shown = cluster.lab["lb1"].ip("-4", "-o", "addr", "show", "dev", PUBLIC_IFACE)
    assert f" {FLOATING_IP}/32 " in shown, "hcloud-floating-ip.service did not restore the IP"
    assert cluster.ssh("lb1", "sysctl -n net.ipv4.ip_nonlocal_bind").strip() == "1"
    for unit in ("hcloud-floating-ip", "haproxy", "hcloud-haproxy-watch", "keepalived"):
        assert cluster.ssh("lb1", f"systemctl is-active {unit}").strip() == "active", unit
    gap = outage(records, t0)
    assert gap.recovered and gap.gap < 5.0, gap
    assert records[-1]["ok"]
    # a web server's reboot: Apache comes back by itself and HAProxy takes it in again
    cluster.reboot("web1")
    cluster.wait_active("web1")
    wait_for(lambda: cluster.backends_up("lb1"), 15, "web1 UP after its reboot", step=0.3)
    assert {cluster.get()["served_by"] for _ in range(4)} == {"web1", "web2"}
