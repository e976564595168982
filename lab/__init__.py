"""Local lab: the HA cluster on this one machine, in network namespaces.

``lab.netns`` has the primitives (hosts, processes, cleanup), ``lab.topology``
the Hetzner-like topology (:class:`LabNetwork`), ``lab.fake_hcloud`` the fake
Hetzner Cloud API that routes the floating IP.
"""

from lab.netns import CommandError, Host, LabError, cleanup_prefix, leftovers, requirements_missing
from lab.topology import LabInterrupted, LabNetwork

__all__ = [
    "CommandError",
    "Host",
    "LabError",
    "LabInterrupted",
    "LabNetwork",
    "cleanup_prefix",
    "leftovers",
    "requirements_missing",
]
