"""The only way out of a lab host: an HTTP proxy for apt, to the Debian mirror only.

How hosts reach the package mirror (and nothing else)
------------------------------------------------------
Each host namespace gets *no* route out.  Instead the lab process opens a
listening socket on ``127.0.0.1:3142`` *inside the host's namespace* (a
thread does ``setns(CLONE_NEWNET)``, binds, and the socket stays in that
namespace), and serves it from the root namespace as a tiny HTTP proxy that
forwards only to the Debian mirror host(s) this machine's apt uses (resolved at
run time by the machine's resolver).  The image's apt points at it
(``Acquire::http::Proxy``), so ``apt-get install`` inside works exactly as on
a server, and every other destination is unreachable.  Immutable files
(``pool/*.deb``, ``by-hash``) are cached under
``<cache_dir>/apt-proxy`` and reused by later hosts and runs (apt still
verifies every file against the signed Release).  This needs no address, veth,
route, NAT rule or ``ip_forward`` change in the root namespace (on this
machine ``ip_forward`` is 0 and neither iptables nor nft is installed; turning
on forwarding would change the whole machine).  DNS: there is none inside
(``/etc/resolv.conf`` has no nameserver); apt never resolves the mirror itself
because it talks to the proxy.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lab.cloud.common import NETNS_DIR, PROXY_ADDR, CloudError
from lab.cloud.rootfs import Mirror
from lab.netns import call_in_netns

# --------------------------------------------------------------------------- netns helpers


def socket_in_netns(netns: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A listening TCP socket bound to ``addr`` inside ``/run/netns/<netns>``.

    Created by a short-lived thread switched into the namespace (only that
    thread changes namespace); the socket keeps its namespace for life.
    Brings ``lo`` up first when ``addr`` is a loopback address.
    """
    path = NETNS_DIR / netns
    if not path.exists():
        raise CloudError(f"network namespace {netns!r} does not exist ({path})")
    if addr[0].startswith("127."):
        subprocess.run(
            ["ip", "-n", netns, "link", "set", "lo", "up"],
            check=True,
            timeout=10,
            capture_output=True,
        )
    return call_in_netns(netns, _listening_socket, addr, timeout=timeout)


def _listening_socket(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(64)
    return s


# --------------------------------------------------------------------------- mirror proxy

_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}
_CACHEABLE = re.compile(
    r"^/[\w.+~%-]+(?:/[\w.+~%-]+)*/(?:pool/.+\.u?deb|dists/.+/by-hash/\w+/[0-9a-f]{32,})$"
)


class MirrorProxy:
    """HTTP proxy for apt that forwards only to the Debian mirror host(s).

    One instance serves any number of namespaces: :meth:`listen` binds a
    socket inside a namespace and serves it from a thread of this process.
    """

    def __init__(
        self,
        mirror: Mirror,
        cache_dir: Path | None,
        log_file: Path,
        upstream_timeout: float = 60.0,
    ) -> None:
        self.mirror = mirror
        self.allowed = set(mirror.hosts)
        self.cache_dir = cache_dir
        self.upstream_timeout = upstream_timeout
        self._log = open(log_file, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._servers: dict[str, tuple[ThreadingHTTPServer, threading.Thread]] = {}
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "bytes": 0, "cache_hits": 0, "denied": 0, "errors": 0}

    def log(self, msg: str) -> None:
        with contextlib.suppress(ValueError):
            self._log.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def listen(self, netns: str, addr: tuple[str, int] = PROXY_ADDR) -> None:
        with self._lock:
            if netns in self._servers:
                return
        sock = socket_in_netns(netns, addr)
        proxy = self

        class Handler(_ProxyHandler):
            pass

        Handler.proxy = proxy
        server = ThreadingHTTPServer(addr, Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        t = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name=f"mirror-proxy-{netns}",
            daemon=True,
        )
        t.start()
        with self._lock:
            self._servers[netns] = (server, t)
        self.log(f"listening in {netns} on {addr[0]}:{addr[1]} for {sorted(self.allowed)}")

    def unlisten(self, netns: str) -> None:
        with self._lock:
            entry = self._servers.pop(netns, None)
        if entry:
            server, t = entry
            server.shutdown()  # returns once serve_forever's loop has seen it (<= poll_interval)
            server.server_close()
            t.join(5)

    def close(self) -> None:
        for netns in list(self._servers):
            self.unlisten(netns)
        with contextlib.suppress(Exception):
            self._log.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: MirrorProxy
    protocol_version = "HTTP/1.1"
    server_version = "hcloud-ha-web-lab-mirror-proxy"
    timeout = 120  # idle client connections are closed

    _upstream: http.client.HTTPConnection | None = None
    _upstream_host: str = ""

    def log_message(self, format: str, *args: Any) -> None:
        self.proxy.log(format % args)

    def do_GET(self) -> None:
        self._forward(head=False)

    def do_HEAD(self) -> None:
        self._forward(head=True)

    def _deny(self, code: int, why: str) -> None:
        self.proxy.count("denied")
        self.send_error(code, why)

    def _connection(self, netloc: str) -> http.client.HTTPConnection:
        if self._upstream is None or self._upstream_host != netloc:
            if self._upstream is not None:
                self._upstream.close()
            self._upstream = http.client.HTTPConnection(netloc, timeout=self.proxy.upstream_timeout)
            self._upstream_host = netloc
        return self._upstream

    def _forward(self, head: bool) -> None:
        p = self.proxy
        p.count("requests")
        url = urllib.parse.urlsplit(self.path)
        netloc = url.netloc.lower()
        if netloc.endswith(":80"):
            netloc = netloc[:-3]
        if url.scheme != "http" or netloc not in p.allowed:
            self._deny(
                403, f"the lab lets hosts reach the Debian mirror only, not {self.path[:200]}"
            )
            return
        target = url.path + (f"?{url.query}" if url.query else "")
        cache_file = None
        if (
            p.cache_dir is not None
            and not head
            and "Range" not in self.headers
            and ".." not in url.path
            and _CACHEABLE.match(url.path)
        ):
            cache_file = p.cache_dir / netloc / url.path.lstrip("/")
            if cache_file.is_file():
                self._serve_file(cache_file)
                return
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"
        }
        headers["Host"] = netloc
        resp = None
        for attempt in range(2):  # one retry on a stale keep-alive upstream connection
            conn = self._connection(netloc)
            try:
                conn.request("HEAD" if head else "GET", target, headers=headers)
                resp = conn.getresponse()
                break
            except (
                http.client.RemoteDisconnected,
                ConnectionError,
                http.client.BadStatusLine,
            ) as exc:
                conn.close()
                self._upstream = None
                if attempt == 1:
                    p.count("errors")
                    self.send_error(502, f"mirror: {exc}")
                    return
            except OSError as exc:
                conn.close()
                self._upstream = None
                p.count("errors")
                self.send_error(502, f"mirror: {exc}")
                return
        assert resp is not None
        try:
            self._relay(resp, head, cache_file)
        finally:
            if resp.will_close and self._upstream is not None:
                self._upstream.close()
                self._upstream = None

    def _relay(self, resp: http.client.HTTPResponse, head: bool, cache_file: Path | None) -> None:
        p = self.proxy
        length = resp.getheader("Content-Length")
        chunked = "chunked" in (resp.getheader("Transfer-Encoding") or "").lower()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        if head or resp.status in (204, 304) or 100 <= resp.status < 200:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            resp.read()
            return
        if length is None or chunked:
            body = resp.read()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            p.count("bytes", len(body))
            return
        total = int(length)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        tmp = None
        out = None
        if cache_file is not None and resp.status == 200:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{threading.get_ident()}.part")
            out = open(tmp, "wb")  # noqa: SIM115 - closed in the finally below
        done = 0
        try:
            while done < total:
                chunk = resp.read(min(1 << 16, total - done))
                if not chunk:
                    break
                self.wfile.write(chunk)
                if out:
                    out.write(chunk)
                done += len(chunk)
        finally:
            p.count("bytes", done)
            if out is not None and tmp is not None and cache_file is not None:
                out.close()
                if done == total:
                    os.replace(tmp, cache_file)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        if done != total:
            self.close_connection = True

    def _serve_file(self, path: Path) -> None:
        p = self.proxy
        p.count("cache_hits")
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as f:
            shutil.copyfileobj(f, self.wfile, 1 << 16)
        p.count("bytes", size)
