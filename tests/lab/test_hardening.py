"""Lab tier: host hardening on the running daemons (HAProxy, Apache, keepalived).

One cluster for the module. Each test leaves it settled (lb1 sole master, every web UP).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time

import pytest

from lab import topology as topo
from lab.cluster import LabCluster, wait_for
from lab.netns import child_pids

pytestmark = pytest.mark.lab
VRRP_PROTO = 112


def curl_headers(c: LabCluster, path: str) -> tuple[str, dict[str, str], str]:
    """Status line, headers (lower-case names) and body the client gets for `path`."""
    proc = c.lab.client.run(
        ["curl", "-s", "-D", "-", "--max-time", "3", f"http://{topo.FLOATING_IP}{path}"],
        check=True,
        timeout=10,
    )
    head, _, body = proc.stdout.replace("\r\n", "\n").partition("\n\n")
    status, *lines = head.splitlines()
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def test_apache_tells_no_version_and_haproxy_adds_security_headers(cluster: LabCluster) -> None:
    status, headers, _ = curl_headers(cluster, "/")
    assert " 200" in status, status
    assert headers["server"] == "Apache", headers  # ServerTokens Prod
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    status, headers, body = curl_headers(cluster, "/no-such-page")
    assert " 404" in status and headers["server"] == "Apache"
    assert "Apache/" not in body and "Server at" not in body, body  # ServerSignature Off
    assert headers["x-content-type-options"] == "nosniff"


def _app_server(sock: socket.socket, stop: threading.Event) -> None:
    """An application that sets its own Referrer-Policy and X-Content-Type-Options."""
    body = b'<p id="served-by">web1<'
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (TimeoutError, OSError):
            continue
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(4096)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                    b"Referrer-Policy: no-referrer\r\nX-Content-Type-Options: app-value\r\n"
                    b"Connection: close\r\n\r\n" + body
                )
            except OSError:
                pass


def _listen(ip: str) -> socket.socket:
    # Apache's killed children may hold port 80 for a moment after their parent died.
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, 80))
            break
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.listen(16)
    sock.settimeout(0.1)
    return sock


def test_haproxy_keeps_the_applications_own_headers(cluster: LabCluster) -> None:
    web1 = cluster.lab["web1"]
    cluster.kill_apache("web1")
    stop = threading.Event()
    sock = web1.call(_listen, web1.private_ip)
    thread = threading.Thread(target=_app_server, args=(sock, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: cluster.backends_up("lb1"), 10, "web1 UP with the test application")
        seen = {}
        for _ in range(6):  # round robin: both servers answer
            _, headers, body = curl_headers(cluster, "/")
            seen["app" if 'served-by">web1<' in body and "<html" not in body else "apache"] = (
                headers
            )
        assert set(seen) == {"app", "apache"}, seen
        assert seen["app"]["referrer-policy"] == "no-referrer"
        assert seen["app"]["x-content-type-options"] == "app-value"
        assert seen["apache"]["referrer-policy"] == "strict-origin-when-cross-origin"
    finally:
        stop.set()
        thread.join(3)
        sock.close()
        cluster.start_apache("web1")
        wait_for(lambda: cluster.backends_up("lb1"), 15, "web1 back with Apache")


def test_haproxy_workers_run_chrooted_without_root(cluster: LabCluster) -> None:
    master = cluster.hosts["lb1"].procs["haproxy"].pid
    workers = child_pids(master)
    assert workers, "no HAProxy worker found"
    jail = str(cluster.hosts["lb1"].root / "var/lib/haproxy")
    for pid in workers:
        assert os.readlink(f"/proc/{pid}/root") == jail
        status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 - tiny read
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        assert set(uid_line.split()[1:]) != {"0"}, uid_line
        assert int(uid_line.split()[1]) == _uid("haproxy")


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


# --- VRRP from a web server ------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def vrrp3_advert(src: str, dst: str, vrid: int, priority: int, vip: str, centis: int) -> bytes:
    """A VRRPv3 advertisement (RFC 5798 5.1) as keepalived expects it."""
    head = struct.pack("!BBBBH", 0x31, vrid, priority, 1, centis & 0x0FFF)
    body = head + b"\0\0" + socket.inet_aton(vip)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 112, len(body))
    return head + struct.pack("!H", _checksum(pseudo + body)) + socket.inet_aton(vip)


def _raw_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, VRRP_PROTO)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 255)
    sock.settimeout(0.05)
    return sock


def _count_from(sock: socket.socket, src: str, stop: threading.Event, out: list[int]) -> None:
    deadline = time.monotonic() + 30
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            packet = sock.recv(2048)
        except (TimeoutError, OSError):
            continue
        if socket.inet_ntoa(packet[12:16]) == src:
            out.append(1)


@pytest.mark.parametrize("priority", [254, 1], ids=["above-master", "below-backup"])
def test_adverts_from_a_web_server_change_nothing(cluster: LabCluster, priority: int) -> None:
    """A web server sends VRRP adverts with the top priority to both LBs. keepalived
    counts adverts only from its peer (check_unicast_src): lb1 stays master, the floating
    IP stays put. Raw sockets on the LBs prove the adverts arrived."""
    assert cluster.settings is not None
    web = cluster.lab["web1"]
    assert web.private_ip is not None

    def transitions() -> tuple[int, int]:  # lb1 leaving MASTER, lb2 taking over
        return cluster.vrrp_transitions("lb1", "BACKUP"), cluster.vrrp_transitions("lb2", "MASTER")

    before = transitions()
    stop = threading.Event()
    received: dict[str, list[int]] = {n: [] for n in topo.LB_NAMES}
    listeners = {n: cluster.lab[n].call(_raw_socket) for n in topo.LB_NAMES}
    threads = [
        threading.Thread(target=_count_from, args=(listeners[n], web.private_ip, stop, received[n]))
        for n in topo.LB_NAMES
    ]
    for t in threads:
        t.start()
    sender = web.call(_raw_socket)
    sent = 0
    masters_seen = set()
    try:
        for _ in range(40):  # 4 s: more than 3 advert intervals plus skew, many times over
            for lb in topo.LB_NAMES:
                dst = topo.LB_PRIVATE_IPS[lb]
                packet = vrrp3_advert(
                    web.private_ip, dst, cluster.settings.vrrp_router_id, priority,
                    topo.FLOATING_IP, round(cluster.settings.vrrp_advert_interval * 100),
                )  # fmt: skip
                sender.sendto(packet, (dst, 0))
                sent += 1
            masters_seen.add(tuple(cluster.masters()))
            time.sleep(0.1)
        time.sleep(1.0)
        masters_seen.add(tuple(cluster.masters()))
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        sender.close()
        for s in listeners.values():
            s.close()
    assert sent == 80
    for lb in topo.LB_NAMES:
        assert len(received[lb]) >= 30, f"{lb} got {len(received[lb])} of 40 adverts"
    assert masters_seen == {("lb1",)}, masters_seen
    after = transitions()
    states = [
        f"{n}: {ln}"
        for n in topo.LB_NAMES
        for ln in cluster.daemon_log(n, "keepalived").splitlines()
        if "STATE" in ln or "timeout" in ln or "priority" in ln
    ]
    assert after == before, "\n".join(states)
    assert cluster.assigned() == "lb1"
