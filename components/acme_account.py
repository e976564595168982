"""The ACME account key both load balancers share, and its RFC 7638 thumbprint.

Why shared: http-01 answers are `<token>.<thumbprint of the account key>`. With one account
key, HAProxy on *either* LB answers every challenge statelessly (`http-request return`),
so each LB can obtain and renew its own certificate whichever of them holds the floating
IP, with no shared storage and no SSH trust between them.

Why RSA, derived here: Debian 12's dehydrated (0.7.0) signs with RSA account keys only, and
the Pulumi program has no crypto library. The key is derived deterministically from 32
secret random bytes kept in Pulumi state (`random.RandomBytes`, a secret), so every run
renders the same key and thumbprint. Only the *account* key comes from here: certificate
keys are generated on each LB and never leave it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field

RSA_BITS = 2048
PUBLIC_EXPONENT = 65537
_MR_ROUNDS = 40
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, math.isqrt(p) + 1))]


class _Drbg:
    """SHA-256 in counter mode over a secret seed: deterministic, uniform bytes."""

    def __init__(self, seed: bytes, label: bytes) -> None:
        self._key = hashlib.sha256(label + b"\0" + seed).digest()
        self._counter = 0

    def bits(self, n: int) -> int:
        out = b""
        while len(out) * 8 < n:
            out += hashlib.sha256(self._key + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        return int.from_bytes(out, "big") >> (len(out) * 8 - n)


def _probable_prime(n: int, drbg: _Drbg) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(_MR_ROUNDS):
        a = 2 + drbg.bits(n.bit_length()) % (n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, drbg: _Drbg) -> int:
    for _ in range(100_000):
        # top two bits set (the modulus gets its full length), odd
        candidate = drbg.bits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % PUBLIC_EXPONENT and _probable_prime(candidate, drbg):
            return candidate
    raise RuntimeError("no prime found (cannot happen with a working hash)")


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_int(v: int) -> bytes:
    raw = v.to_bytes(v.bit_length() // 8 + 1, "big")  # leading 0 keeps it positive
    return b"\x02" + _der_len(len(raw)) + raw


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class AccountKey:
    modulus: int
    private_pem: str = field(repr=False)

    @property
    def jwk(self) -> dict[str, str]:
        n = self.modulus.to_bytes((self.modulus.bit_length() + 7) // 8, "big")
        e = PUBLIC_EXPONENT.to_bytes(3, "big")
        return {"e": _b64url(e), "kty": "RSA", "n": _b64url(n)}

    @property
    def thumbprint(self) -> str:
        """RFC 7638: base64url(SHA-256(JWK with the required members, sorted, no spaces))."""
        canonical = json.dumps(self.jwk, sort_keys=True, separators=(",", ":"))
        return _b64url(hashlib.sha256(canonical.encode()).digest())


def account_key(seed: bytes) -> AccountKey:
    """The RSA account key derived from `seed` (at least 32 secret random bytes)."""
    if len(seed) < 32:
        raise ValueError("the ACME account key seed needs at least 32 bytes")
    drbg = _Drbg(seed, b"hcloud-ha-web acme account key v1")
    e = PUBLIC_EXPONENT
    for _ in range(100):
        p, q = _prime(RSA_BITS // 2, drbg), _prime(RSA_BITS // 2, drbg)
        if p != q and (p * q).bit_length() == RSA_BITS:
            break
    else:  # pragma: no cover
        raise RuntimeError("no RSA key found")
    p, q = max(p, q), min(p, q)
    n = p * q
    d = pow(e, -1, math.lcm(p - 1, q - 1))
    body = b"".join(
        _der_int(v) for v in (0, n, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))
    )
    der = b"\x30" + _der_len(len(body)) + body
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    pem = (
        "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----\n"
    )
    return AccountKey(modulus=n, private_pem=pem)


def account_key_from_b64(seed_b64: str) -> AccountKey:
    """`account_key` of a base64 seed (what `random.RandomBytes.base64` gives)."""
    return account_key(base64.b64decode(seed_b64))
