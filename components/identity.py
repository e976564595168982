"""The settings a deployed cluster cannot roll: refused with a clear error, before any change.

`location`, `networkCidr` and `clusterName` name things every server is built on (the
network zone, every private address, every resource name). Changing one in place would
rebuild the whole cluster at once: downtime. `ClusterIdentity` is a dynamic-provider
resource that holds them; its provider's `check(olds, news)` sees the values of the last
deployment next to the new ones (Pulumi: "check ... olds: the old input properties to
use for validation") and fails with `CheckFailure`s when one changed, unless
`allowDisruptiveChanges` is true. The engine runs `check` when the resource is
registered; every other resource depends on it, so nothing has changed when it fails.
"""

from __future__ import annotations

from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    CreateResult,
    ResourceProvider,
    UpdateResult,
)

from components.config import PROJECT, Settings

#: Config key -> Settings attribute of what cannot roll.
FIXED_KEYS = {"location": "location", "networkCidr": "network_cidr", "clusterName": "cluster_name"}
OVERRIDE_KEY = "allowDisruptiveChanges"


def identity_inputs(settings: Settings) -> dict[str, Any]:
    return {
        **{key: getattr(settings, attr) for key, attr in FIXED_KEYS.items()},
        OVERRIDE_KEY: settings.allow_disruptive_changes,
    }


def refusals(olds: dict[str, Any], news: dict[str, Any]) -> list[CheckFailure]:
    """What changed that cannot roll (empty when nothing did, or on the first deployment,
    or when the override is set)."""
    if not olds or news.get(OVERRIDE_KEY):
        return []
    failures = []
    for key in FIXED_KEYS:
        if key in olds and olds[key] != news.get(key):
            failures.append(
                CheckFailure(
                    key,
                    f"'{PROJECT}:{key}' cannot change on a deployed cluster "
                    f"({olds[key]!r} -> {news.get(key)!r}): it would rebuild every server at "
                    "once. Deploy the new settings as a new stack (pulumi stack init), move "
                    "traffic to its floating IP, then destroy this one; or set "
                    f"'{PROJECT}:{OVERRIDE_KEY}' true to rebuild in place with downtime.",
                )
            )
    return failures


class ClusterIdentityProvider(ResourceProvider):
    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        return CheckResult(news, refusals(_olds, news))

    def create(self, props: dict[str, Any]) -> CreateResult:
        return CreateResult(f"{props['clusterName']}-identity", props)

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        return UpdateResult(news)


class ClusterIdentity(pulumi.dynamic.Resource):
    """Holds the settings that cannot roll; refuses to change them (see module doc)."""

    def __init__(
        self, name: str, settings: Settings, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(ClusterIdentityProvider(), name, identity_inputs(settings), opts)
