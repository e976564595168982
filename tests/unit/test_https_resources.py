"""HTTPS in the resource graph (mocks): DNS records, reverse DNS, the shared ACME account
key, outputs that tell the truth, and no key material in any resource input."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pulumi
import pytest

from components.acme_account import account_key
from components.cluster import HaWebCluster
from tests.conftest import (
    SECRET_MARK,
    SECRET_SIG,
    RecordingMonitor,
    find_plaintext,
    is_secret,
    make_stack,
    resolve,
    run,
)

ZONE_RRSET = "hcloud:index/zoneRrset:ZoneRrset"
RDNS = "hcloud:index/rdns:Rdns"
RANDOM_BYTES = "random:index/randomBytes:RandomBytes"
FIP_ADDRESS = "192.0.2.44"  # what the mocked provider gives the floating IP
HTTPS = {"domains": ("example.com", "www.example.com"), "acme_email": "ops@example.com"}


def build(**overrides: Any) -> HaWebCluster:
    return run(lambda: HaWebCluster("t", make_stack(**overrides)))  # type: ignore[no-any-return]


def test_with_dns_zone_every_domain_gets_an_a_record_to_the_floating_ip(
    monitor: RecordingMonitor,
) -> None:
    build(**HTTPS, dns_zone="example.com")
    rrsets = {r.inputs["name"]: r.inputs for r in monitor.of_type(ZONE_RRSET)}
    assert set(rrsets) == {"@", "www"}  # names relative to the zone, "@" the apex
    for inputs in rrsets.values():
        assert inputs["zone"] == "example.com"
        assert inputs["type"] == "A"
        assert [rec["value"] for rec in inputs["records"]] == [FIP_ADDRESS]


def test_with_dns_zone_the_floating_ips_reverse_dns_names_the_primary_domain(
    monitor: RecordingMonitor,
) -> None:
    build(**HTTPS, dns_zone="example.com")
    (rdns,) = monitor.of_type(RDNS)
    fip = monitor.named("t-fip")
    assert rdns.inputs["ipAddress"] == FIP_ADDRESS
    assert rdns.inputs["floatingIpId"] == int(fip.id)
    assert rdns.inputs["dnsPtr"] == "example.com"
    assert "serverId" not in rdns.inputs


def test_provisioning_waits_for_the_dns_records(monitor: RecordingMonitor) -> None:
    """Issuance runs in the LBs' acme step: their A records must exist by then."""
    build(**HTTPS, dns_zone="example.com")
    record_urns = {r.urn for r in monitor.of_type(ZONE_RRSET)}
    acme_steps = [r for r in monitor.registrations if r.name.endswith("-acme")]
    assert {r.name for r in acme_steps} == {"t-lb1-acme", "t-lb2-acme"}
    for lb in ("t-lb1-base", "t-lb2-base"):
        assert record_urns <= set(monitor.named(lb).dependencies), lb


def test_subdomains_of_a_zone_get_relative_names(monitor: RecordingMonitor) -> None:
    build(
        domains=("shop.eu.example.net", "eu.example.net"),
        acme_email="a@example.net",
        dns_zone="eu.example.net",
    )
    names = sorted(r.inputs["name"] for r in monitor.of_type(ZONE_RRSET))
    assert names == ["@", "shop"]


def test_without_dns_zone_no_record_is_created_and_the_output_lists_them(
    monitor: RecordingMonitor,
) -> None:
    cluster = build(**HTTPS)
    assert monitor.of_type(ZONE_RRSET) == [] and monitor.of_type(RDNS) == []
    assert resolve(cluster.dns_records) == {
        "example.com": FIP_ADDRESS,
        "www.example.com": FIP_ADDRESS,
    }


def test_with_domains_urls_are_https_on_the_primary_name(monitor: RecordingMonitor) -> None:
    cluster = build(**HTTPS)
    assert resolve(cluster.site_url) == "https://example.com/"
    assert resolve(cluster.stats_url).startswith("https://example.com/haproxy?stats")


def test_without_domains_nothing_https_is_created_and_pulumi_warns(
    monitor: RecordingMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warnings.append(msg))
    cluster = build()
    assert monitor.of_type(RANDOM_BYTES) == []
    assert monitor.of_type(ZONE_RRSET) == [] and monitor.of_type(RDNS) == []
    assert resolve(cluster.dns_records) == {}
    assert any("domains is empty" in w and "HTTP" in w for w in warnings), warnings


def test_with_domains_there_is_no_warning(
    monitor: RecordingMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda msg, *a, **k: warnings.append(msg))
    build(**HTTPS)
    assert not [w for w in warnings if "domains" in w]


def test_the_account_key_seed_is_secret_and_no_key_material_is_in_any_input(
    monitor: RecordingMonitor,
) -> None:
    cluster = build(**HTTPS, dns_zone="example.com")
    (seed,) = monitor.of_type(RANDOM_BYTES)
    assert seed.inputs["length"] >= 32
    assert cluster.acme_account_seed is not None and is_secret(cluster.acme_account_seed)
    # The key the LBs get is derived from the provider's bytes (the mock: sha256 of the name).
    raw = hashlib.sha256(seed.name.encode()).digest()[:32]
    key = account_key(raw)
    pem_body = key.private_pem.splitlines()[1]
    seed_b64 = base64.b64encode(raw).decode()
    assert monitor.registrations
    for reg in monitor.registrations:
        for needle in (pem_body, seed_b64, "PRIVATE KEY"):
            assert find_plaintext(reg.wire, needle) == [], f"{needle[:20]} in {reg.name}"
    # ...and the acme step does ship it, as a secret (so the scan above saw real traffic)
    stdin = monitor.named("t-lb1-acme").wire["stdin"]
    assert stdin[SECRET_SIG] == SECRET_MARK
    assert find_plaintext({"stdin": stdin["value"]}, pem_body) == [".stdin"]


def test_account_key_is_a_valid_rsa_key_with_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    """Checked against openssl, not against our own code: modulus and key consistency."""
    key = account_key(bytes(range(32)))
    path = tmp_path / "k.pem"
    path.write_text(key.private_pem)
    check = subprocess.run(
        ["openssl", "rsa", "-in", str(path), "-check", "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0 and "RSA key ok" in check.stdout, check.stderr
    modulus = subprocess.run(
        ["openssl", "rsa", "-in", str(path), "-noout", "-modulus"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    n = bytes.fromhex(modulus.strip().split("=", 1)[1])
    b64 = base64.urlsafe_b64encode(n).rstrip(b"=").decode()
    jwk = '{"e":"AQAB","kty":"RSA","n":"' + b64 + '"}'  # RFC 7638 section 3.3 form
    expected = base64.urlsafe_b64encode(hashlib.sha256(jwk.encode()).digest()).rstrip(b"=")
    assert key.thumbprint == expected.decode()
    assert account_key(bytes(range(32))).private_pem == key.private_pem  # deterministic
    assert account_key(bytes(range(1, 33))).thumbprint != key.thumbprint
