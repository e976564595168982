"""Let's Encrypt's test CA in the lab: Pebble with pebble-challtestsrv as its DNS.

``launch_acme(lab)`` adds a host ``acme`` (198.19.0.3, public side only) and starts, in its
namespace, ``pebble-challtestsrv`` (DNS on :8053 answering every name with the floating IP)
and ``pebble`` (ACME API on :14000 over TLS, management on :15000). Both are processes of
the ``acme`` host, stopped by PID at lab teardown like the fake Hetzner API.

* Pebble's API certificate comes from a CA this module makes (``api_ca``): the LBs' ACME
  client trusts that file through the lab-only ``Layout.acme_ca_bundle``, nothing else does.
* The issuing root (``issuing_root``) is fetched from Pebble's management port; a client
  verifies the site against it. Pebble makes a new root at every start.
* Pebble validates http-01 by connecting to the floating IP on port 80 the way the internet
  does: the acme namespace routes the floating IP through the client namespace (which then
  forwards, ICMP redirects off), so validation reaches whichever LB the fake Hetzner API
  routes the floating IP to, exactly as the client's own requests do.
* ``refuse(domain)`` points the domain at an address where nothing listens, so Pebble's
  validation fails (the CA refuses the order); ``accept(domain)`` undoes it.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import topology as topo
from lab.netns import Host, LabError
from lab.topology import LabNetwork

ACME_IP = "198.19.0.3"
ACME_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053
CHALLTESTSRV_PORT = 8055
#: Where a refused domain points: the acme host itself, port 80, where nothing listens.
REFUSE_ADDRESS = ACME_IP


@dataclass
class PebbleCA:
    host: Host
    workdir: Path
    api_ca: Path
    """CA file that signed Pebble's API certificate (what the LBs' ACME client trusts)."""
    issuing_root: Path
    """Pebble's issuing root: what a client verifies the site's certificate against."""
    procs: list[subprocess.Popen[Any]]

    @property
    def directory_url(self) -> str:
        return f"https://{ACME_IP}:{ACME_PORT}/dir"

    def _challtestsrv(self, path: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        url = f"http://{ACME_IP}:{CHALLTESTSRV_PORT}{path}"

        def post() -> int:
            req = urllib.request.Request(url, data=data, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)

        status = self.host.call(post)
        if status != 200:
            raise LabError(f"challtestsrv {path} answered {status}")

    def refuse(self, domain: str) -> None:
        """Validation of ``domain`` fails from now on: its A record names a dead port."""
        self._challtestsrv("/add-a", {"host": domain, "addresses": [REFUSE_ADDRESS]})

    def accept(self, domain: str) -> None:
        """Undo :meth:`refuse`: the domain resolves to the floating IP again."""
        self._challtestsrv("/clear-a", {"host": domain})

    def stop(self) -> None:
        for proc in self.procs:
            self.host.kill(proc)

    def log(self) -> str:
        parts = []
        for name in ("pebble.log", "challtestsrv.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_api_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A lab CA and, signed by it, Pebble's API certificate for 198.19.0.3 (ECDSA P-256)."""
    ca_key, ca_crt = workdir / "api-ca.key", workdir / "api-ca.pem"
    key, csr, crt = workdir / "api.key", workdir / "api.csr", workdir / "api.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc"]
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=hcloud-ha-web lab ACME API CA",
             "-keyout", str(ca_key), "-out", str(ca_crt))  # fmt: skip
    _openssl("req", *ec, "-subj", f"/CN={ACME_IP}", "-keyout", str(key), "-out", str(csr))
    ext = workdir / "api.ext"
    ext.write_text(f"subjectAltName=IP:{ACME_IP}\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))  # fmt: skip
    return ca_crt, crt, key


def launch_acme(
    lab: LabNetwork, ready_timeout: float = 15.0, validity_seconds: int | None = None
) -> PebbleCA:
    """Start challtestsrv + Pebble on a new ``acme`` host; wait until Pebble answers.

    ``validity_seconds``: lifetime of the certificates Pebble issues (default: 5 years);
    below the renewal window it makes every certificate due, as an old one would be."""
    workdir = lab.workdir / "acme"
    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    host = lab.hosts.get("acme") or lab.add_public_host("acme", ACME_IP)
    # Reach the floating IP the way the client does (its route follows the fake API).
    lab.client.sysctl("net.ipv4.ip_forward", 1)
    for conf in ("all", "default", topo.PUBLIC_IFACE):
        lab.client.sysctl(f"net.ipv4.conf.{conf}.send_redirects", 0)
        host.sysctl(f"net.ipv4.conf.{conf}.accept_redirects", 0)
    host.ip("route", "replace", f"{topo.FLOATING_IP}/32", "via", topo.CLIENT_IP)

    api_ca, crt, key = make_api_certificate(workdir)
    config = workdir / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"{ACME_IP}:{ACME_PORT}",
                    "managementListenAddress": f"{ACME_IP}:{MANAGEMENT_PORT}",
                    "certificate": str(crt),
                    "privateKey": str(key),
                    "httpPort": 80,
                    "tlsPort": 443,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                    **({"certificateValidityPeriod": validity_seconds} if validity_seconds else {}),
                }
            }
        )
    )
    procs = [
        host.popen(
            [
                "pebble-challtestsrv",
                "-defaultIPv4",
                topo.FLOATING_IP,
                "-defaultIPv6",
                "",
                "-dns01",
                f"{ACME_IP}:{DNS_PORT}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"{ACME_IP}:{CHALLTESTSRV_PORT}",
            ],
            log=workdir / "challtestsrv.log",
        ),
        host.popen(
            ["pebble", "-config", str(config), "-dnsserver", f"{ACME_IP}:{DNS_PORT}"],
            log=workdir / "pebble.log",
            # no sleeping before validation, no random nonce rejection, no authz reuse (a
            # refused domain must really be validated again)
            env={
                **os.environ,
                "PEBBLE_VA_NOSLEEP": "1",
                "PEBBLE_WFE_NONCEREJECT": "0",
                "PEBBLE_AUTHZREUSE": "0",
            },
        ),
    ]
    ca = PebbleCA(host, workdir, api_ca, workdir / "pebble-issuing-root.pem", procs)
    ctx = ssl.create_default_context(cafile=str(api_ca))

    def get_root() -> str:
        url = f"https://{ACME_IP}:{MANAGEMENT_PORT}/roots/0"
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return str(resp.read().decode())

    from lab.cluster import wait_for  # late: lab.cluster imports this module

    def root_ready() -> str:
        for proc in procs:
            if proc.poll() is not None:
                raise LabError(f"{proc.args!r} exited:\n{ca.log()}")
        return host.call(get_root)

    try:
        pem = wait_for(root_ready, ready_timeout, "Pebble's management API", step=0.2)
    except (TimeoutError, LabError) as exc:
        raise LabError(f"Pebble did not come up: {exc}\n{ca.log()}") from None
    ca.issuing_root.write_text(pem)
    ca.issuing_root.chmod(0o644)
    return ca
