"""Local cloud foundation: real Debian 13 and 12 systemd hosts booted with systemd-nspawn.

One module-scoped run boots a Debian 13 (``deb13``) and a Debian 12 (``deb12``)
host in namespaces of a tiny test network, then checks in order: SSH as root
by key, systemd state, the namespace seam (each host sees its own eth0 and
reaches the other over the bridge), the things provisioning needs
(``CAP_NET_ADMIN``, writable ``/proc/sys/net``), that only the Debian mirror is
reachable, ``apt-get install haproxy`` from the mirror with systemd running it,
a reboot (relaunch) bringing it back, and a teardown that leaves nothing.

Printed benchmarks: rootfs build time (cold, from the build record, and
cached), boot-to-ssh time, apt install time, reboot time, memory per host.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from lab.cloud.cleanup import leftovers
from lab.cloud.host import CloudHost
from lab.cloud.lab import CloudLab, parallel
from lab.cloud.rootfs import build_all, suite_of

if TYPE_CHECKING:  # conftest is loaded by pytest; importing it again would duplicate its state
    from tests.cloud.conftest import Bench, TestNet

pytestmark = pytest.mark.cloud

#: host name -> Debian release (Hetzner image name)
HOSTS = {"deb13": "debian-13", "deb12": "debian-12"}
VERSION_ID = {"deb13": "13", "deb12": "12"}
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=120"

T = TypeVar("T")


@dataclass
class Cloud:
    lab: CloudLab
    net: TestNet
    hosts: dict[str, CloudHost]

    def each(self, fn: Callable[[CloudHost], T]) -> dict[str, T]:
        """``fn(host)`` for every host, in parallel threads."""
        return dict(zip(self.hosts, parallel(fn, self.hosts.values()), strict=True))


@pytest.fixture(scope="module")
def images(cloud_prefix: str, bench: Bench) -> dict[str, Any]:
    """Both rootfs tarballs (built in parallel when missing), timed cold and cached."""
    suites = [suite_of(r) for r in HOSTS.values()]
    t0 = time.monotonic()
    first = build_all(suites, log=print)
    first_total = time.monotonic() - t0
    again = build_all(suites)
    for img, img2 in zip(first, again, strict=True):
        assert not img2.built, (
            f"{img.suite}: second ensure_rootfs rebuilt instead of reusing the cache"
        )
        if img.cold_seconds is not None:
            bench.record(
                "rootfs_build_cold",
                img.cold_seconds,
                "s",
                suite=img.suite,
                built_now=img.built,
                mib=img.size_bytes >> 20,
            )
        bench.record("rootfs_cached", img2.seconds, "s", suite=img.suite)
    if any(i.built for i in first):
        bench.record("rootfs_build_parallel_wall", first_total, "s", suites=suites)
    return {i.suite: i for i in first}


@pytest.fixture(scope="module")
def cloud(
    cloud_prefix: str,
    images: dict[str, Any],
    make_test_net: Callable[[list[str]], TestNet],
    bench: Bench,
) -> Iterator[Cloud]:
    net = make_test_net(list(HOSTS))
    with CloudLab(prefix=cloud_prefix) as lab:
        hosts = {name: lab.host(name, net.netns[name], release) for name, release in HOSTS.items()}
        t0 = time.monotonic()
        timings = lab.boot(*hosts.values())
        bench.record(
            "boot_parallel_wall",
            time.monotonic() - t0,
            "s",
            hosts=len(hosts),
            note="incl. overlay mount, host keys, first-time tree extraction",
        )
        for name, t in timings.items():
            bench.record(
                "boot_to_ssh",
                t.ssh_ready,
                "s",
                host=name,
                release=HOSTS[name],
                system_ready=round(t.system_ready, 3),
                state=t.state,
                mode=lab.mode,
            )
        yield Cloud(lab, net, hosts)
    net.close()


def test_ssh_root_by_key_and_systemd_running(cloud: Cloud) -> None:
    out = cloud.each(
        lambda h: h.ssh(
            ". /etc/os-release; echo $VERSION_ID; id -un; hostname; systemctl is-system-running; "
            "systemd-detect-virt; systemctl is-active ssh dbus; "
            "test -s /etc/machine-id && cat /etc/machine-id"
        ).stdout.split()
    )
    ids = set()
    for name, words in out.items():
        version, user, hostname, state, virt, ssh_state, dbus_state, machine_id = words
        assert version == VERSION_ID[name], words
        assert (user, hostname) == ("root", name)
        assert state in ("running", "degraded"), f"{name}: system {state}"
        assert virt == "systemd-nspawn"
        assert (ssh_state, dbus_state) == ("active", "active")
        ids.add(machine_id)
    assert len(ids) == len(cloud.hosts), "hosts share a machine-id"
    # Password logins are refused: root gets in by the generated key only.
    sshd = cloud.each(
        lambda h: h.ssh("sshd -T | grep -Ei '^(permitrootlogin|passwordauthentication) '").stdout
    )
    for text in sshd.values():
        assert (
            "permitrootlogin without-password" in text
            or "permitrootlogin prohibit-password" in text
        )
        assert "passwordauthentication no" in text


def test_hosts_live_in_their_namespace(cloud: Cloud) -> None:
    """The seam: a host sees exactly its namespace's interfaces and reaches its neighbours."""
    for name, h in cloud.hosts.items():
        addr = cloud.net.addresses[name]
        shown = h.ssh("ip -o -4 addr show dev eth0").stdout
        assert f"{addr}/24" in shown
        other = next(a for n, a in cloud.net.addresses.items() if n != name)
        h.ssh(f"ping -c1 -W2 {other}")
        # sshd answers on the namespace address too (what provisioning will use)
        r = h.ssh("hostname", check=False)
        assert r.returncode == 0
        ssh_on_addr = h.ssh_argv("hostname", address=addr)
        assert (
            subprocess.run(ssh_on_addr, capture_output=True, text=True, timeout=30).stdout.strip()
            == name
        )


def test_provisioning_privileges(cloud: Cloud) -> None:
    """What the remote steps need: files on stdin (secrets never in the command line),
    add an address (CAP_NET_ADMIN) and set net sysctls."""
    payload = "secret-on-stdin\n" * 1000
    for n, h in enumerate(cloud.hosts.values()):
        got = h.ssh(
            "umask 077 && cat > /root/stdin.txt && stat -c %a /root/stdin.txt && "
            "wc -c < /root/stdin.txt",
            stdin=payload,
        ).stdout.split()
        assert got == ["600", str(len(payload))]
        fip = f"198.18.1.{10 + n}"
        h.ssh(
            f"ip addr add {fip}/32 dev eth0 && ip -o addr show dev eth0 | grep -q {fip} && "
            f"ip addr del {fip}/32 dev eth0"
        )
        assert (
            h.ssh(
                "sysctl -w net.ipv4.ip_nonlocal_bind=1 && sysctl -n net.ipv4.ip_nonlocal_bind"
            ).stdout.split()[-1]
            == "1"
        )


def test_only_the_mirror_is_reachable(cloud: Cloud) -> None:
    mirror_host = cloud.lab.mirror.hosts[0].split(":")[0]
    mirror_ip = socket.gethostbyname(mirror_host)  # resolved here, in the root namespace
    h = cloud.hosts["deb13"]
    direct = h.ssh(f"curl -sS -m 5 -o /dev/null http://{mirror_ip}/", check=False)
    # curl ran and could not connect (exit 7: no route), not "curl missing" (127) or a
    # timeout (28) that a half-open route would also give.
    assert direct.returncode == 7, f"host must have no route out: {direct}"
    other = h.ssh(
        "curl -s -m 10 -o /dev/null -w '%{http_code}' -x http://127.0.0.1:3142 http://example.org/",
        check=False,
    )
    assert other.stdout.strip() == "403", f"proxy let a non-mirror host through: {other}"
    # getent exits 2 for "no such key": it ran and found no answer (127 would mean missing).
    resolved = h.ssh(f"getent hosts {mirror_host}", check=False)
    assert resolved.returncode == 2, f"DNS must not resolve inside: {resolved}"


def test_apt_install_haproxy_from_mirror(cloud: Cloud, bench: Bench) -> None:
    def install(h: CloudHost) -> float:
        t0 = time.monotonic()
        h.ssh(f"{APT} update && {APT} install -y haproxy", timeout=900)
        return time.monotonic() - t0

    took = cloud.each(install)
    for name, seconds in took.items():
        bench.record("apt_install_haproxy", seconds, "s", host=name, release=HOSTS[name])
    bench.record(
        "mirror_proxy", cloud.lab.proxy.stats["requests"], "requests", **cloud.lab.proxy.stats
    )
    states = cloud.each(
        lambda h: h.ssh(
            "systemctl is-active haproxy; systemctl is-enabled haproxy; haproxy -v | head -1"
        ).stdout.splitlines()
    )
    for name, (active, enabled, version) in states.items():
        assert (active, enabled) == ("active", "enabled"), f"{name}: haproxy {active}/{enabled}"
        assert version.startswith("HAProxy version"), version
    for name, m in cloud.each(lambda h: h.memory()).items():
        record_memory(bench, "memory_after_haproxy", name, m)


def test_reboot_brings_services_back(cloud: Cloud, bench: Bench) -> None:
    before = cloud.each(
        lambda h: h.ssh(
            "echo kept > /root/marker; cat /etc/machine-id; "
            "systemctl show -p MainPID --value haproxy"
        ).stdout.split()
    )

    def reboot(h: CloudHost) -> float:
        return h.reboot().ssh_ready

    took = cloud.each(reboot)
    for name, seconds in took.items():
        bench.record("reboot_to_ssh", seconds, "s", host=name, boots=cloud.hosts[name].boots)
    after = cloud.each(
        lambda h: h.ssh(
            "cat /root/marker /etc/machine-id; systemctl is-active haproxy; "
            "systemctl is-system-running --wait"
        ).stdout.split()
    )
    for name, (marker, machine_id, active, state) in after.items():
        assert marker == "kept", "root file system changed across the reboot"
        assert machine_id == before[name][0]
        assert active == "active", f"{name}: haproxy not active after reboot"
        assert state in ("running", "degraded")
    for name, h in cloud.hosts.items():
        assert h.netns == cloud.net.netns[name]
        assert cloud.net.addresses[name] in h.ssh("ip -o -4 addr show dev eth0").stdout


def record_memory(bench: Bench, what: str, name: str, m: dict[str, Any]) -> None:
    mib = 2**20
    cgroup = "cgroup_anon_bytes" in m
    bench.record(
        what,
        (m["cgroup_anon_bytes"] if cgroup else m["pss_sum_bytes"]) / mib,
        "MiB",
        host=name,
        release=HOSTS[name],
        measure="cgroup anon (RSS without page cache)" if cgroup else "PSS sum (no memory cgroup)",
        anon_peak_mib=round(m["anon_peak_bytes"] / mib, 1),
        pss_sum_mib=round(m["pss_sum_bytes"] / mib, 1),
        rss_sum_mib=round(m["rss_sum_bytes"] / mib, 1),
        cgroup_incl_cache_mib=round(m.get("cgroup_current_bytes", 0) / mib, 1),
        processes=m["processes"],
    )


def test_memory_per_host(cloud: Cloud, bench: Bench) -> None:
    for name, m in cloud.each(lambda h: h.memory()).items():
        assert m["processes"] > 3
        assert 0 < m["pss_sum_bytes"] <= m["rss_sum_bytes"]
        record_memory(bench, "memory_per_host", name, m)
        bench.record(
            "memory_peak_per_host",
            cloud.hosts[name].anon_peak_bytes() / 2**20,
            "MiB",
            host=name,
            release=HOSTS[name],
            measure="highest cgroup anon (or PSS sum) sampled every 0.5 s over all boots",
            cgroup_peak_incl_cache_mib=round(cloud.hosts[name].memory_peak_bytes() / 2**20, 1),
        )


def test_teardown_leaves_nothing(cloud: Cloud) -> None:
    prefix = cloud.lab.prefix
    pids = {name: h._proc.pid for name, h in cloud.hosts.items() if h._proc is not None}
    workdir = cloud.lab.workdir
    cloud.lab.close()
    problems = cloud.net.close()
    assert not problems, problems
    assert leftovers(prefix) == []
    assert cloud.net.leftovers() == []
    assert not workdir.exists()
    for name, pid in pids.items():
        assert not os.path.exists(f"/proc/{pid}"), f"{name}: nspawn {pid} still running"
