"""What Hetzner Cloud offers, as the settings are checked against it: locations and their
network zones, server types (architecture, memory, where they exist), images, and the
rules for cloud networks. Facts only; `components.config` validates with them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

#: Hetzner location -> network zone of its cloud networks.
NETWORK_ZONES: Mapping[str, str] = {
    "fsn1": "eu-central",
    "nbg1": "eu-central",
    "hel1": "eu-central",
    "ash": "us-east",
    "hil": "us-west",
    "sin": "ap-southeast",
}

#: Server types per location and CPU architecture, with memory (MiB) for sizing HAProxy's
#: connection limit. Source: Hetzner Cloud server overview
#: (https://docs.hetzner.com/cloud/servers/overview, locations and types as listed there on
#: 2026-11-27): CX (shared Intel/AMD, gen 3) and CAX (Ampere Arm) only in the EU
#: locations, CPX (shared AMD) and CCX (dedicated AMD) everywhere. When Hetzner adds
#: a type, set `allowUnlistedServerType: true` (and extend this table in a change).
_EU = ("fsn1", "nbg1", "hel1")
_ALL = ("fsn1", "nbg1", "hel1", "ash", "hil", "sin")


@dataclass(frozen=True)
class ServerTypeInfo:
    architecture: str  # "x86" or "arm", as the Hetzner API names them
    memory_mib: int
    locations: tuple[str, ...]


SERVER_TYPES: Mapping[str, ServerTypeInfo] = {
    **{
        f"cx{n}3": ServerTypeInfo("x86", mem, _EU)
        for n, mem in ((2, 4096), (3, 8192), (4, 16384), (5, 32768))
    },
    **{
        f"cax{n}1": ServerTypeInfo("arm", mem, _EU)
        for n, mem in ((1, 4096), (2, 8192), (3, 16384), (4, 32768))
    },
    **{
        f"cpx{n}1": ServerTypeInfo("x86", mem, _ALL)
        for n, mem in ((1, 2048), (2, 4096), (3, 8192), (4, 16384), (5, 32768))
    },
    # CPX gen 2 (cpx22 is the type DESIGN.md names), offered beside gen 1.
    **{
        f"cpx{n}2": ServerTypeInfo("x86", mem, _ALL)
        for n, mem in ((1, 2048), (2, 4096), (3, 8192), (4, 16384), (5, 24576), (6, 32768))
    },
    **{
        f"ccx{n}3": ServerTypeInfo("x86", mem, _ALL)
        for n, mem in ((1, 8192), (2, 16384), (3, 32768), (4, 65536), (5, 131072), (6, 196608))
    },
}
#: Images the templates are written for, and the architectures Hetzner offers them in.
IMAGES: Mapping[str, tuple[str, ...]] = {"debian-12": ("x86", "arm"), "debian-13": ("x86", "arm")}
#: Memory assumed for a type the table does not list (allowUnlistedServerType): the smallest.
UNLISTED_MEMORY_MIB = 2048
#: Hetzner cloud networks must lie in RFC 1918 space and be /24 or larger.
RFC1918 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
NETWORK_MAX_PREFIX = 24
