"""alertWebhookUrl: optional secret, validated without being echoed, shipped only in the
LB ops step's secret stdin (a 0600 file), never in command text."""

from __future__ import annotations

import base64
import io
import tarfile
from typing import Any

import pytest

from components.config import SettingsError
from lab.program import ProviderFacts, RemoteStep, program_steps
from tests.conftest import RecordingMonitor, valid_config
from tests.unit.test_settings import load

URL = "https://hooks.example.com/services/T0KEN-must-not-leak"
HOSTS = ("lb1", "lb2", "web1", "web2")
FACTS = ProviderFacts(
    servers={f"hcloud-ha-web-{h}": (500 + i, f"198.18.9.{10 + i}") for i, h in enumerate(HOSTS)},
    floating_ip=(4711, "198.19.1.1"),
)


def steps(**overrides: Any) -> dict[str, RemoteStep]:
    config, secret_keys = valid_config(**overrides)
    return program_steps(config, secret_keys, FACTS)


def files_of(step: RemoteStep) -> dict[str, tuple[int, str]]:
    raw = base64.b64decode(step.stdin)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        return {
            "/" + m.name: (m.mode, tar.extractfile(m).read().decode())  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


@pytest.mark.parametrize(
    "bad",
    [
        "ftp://hooks.example.com/x",
        "https://hooks.example.com/a b",
        'https://h/"x',
        "not-a-url-S3CRET",
    ],
)
def test_a_bad_webhook_url_fails_naming_the_key_but_not_the_value(
    monitor: RecordingMonitor, bad: str
) -> None:
    with pytest.raises(SettingsError) as err:
        load(monitor, alertWebhookUrl=bad)
    assert err.value.key == "alertWebhookUrl"
    assert bad not in str(err.value)
    assert monitor.registrations == []


def test_the_url_reaches_each_lb_as_a_root_only_file_and_nowhere_else() -> None:
    plan = steps(alertWebhookUrl=URL)
    for lb in ("lb1", "lb2"):
        ops = plan[f"hcloud-ha-web-{lb}-ops"]
        mode, content = files_of(ops)["/etc/hcloud-ha-web/alert-webhook-url"]
        assert (mode, content) == (0o600, URL + "\n")
    for name, step in plan.items():
        assert URL not in step.create, f"{name}: URL in command text"
        assert all(URL not in t for t in step.triggers), f"{name}: URL in a trigger"
        if name.endswith("-keys"):  # authorized_keys as plain text, not a tarball
            assert URL not in step.stdin
        elif not name.endswith("-ops"):
            assert all(URL not in c for _, c in files_of(step).values()) if step.stdin else True


def test_without_a_url_the_hook_file_is_empty_and_changing_it_touches_only_the_ops_steps() -> None:
    without = steps()
    assert (
        files_of(without["hcloud-ha-web-lb1-ops"])["/etc/hcloud-ha-web/alert-webhook-url"][1]
        == "\n"
    )
    with_url = steps(alertWebhookUrl=URL)
    changed = {n for n in without if without[n].inputs != with_url[n].inputs}
    # ...and each LB's readiness check, which re-runs after any change on its host.
    assert changed == {
        "hcloud-ha-web-lb1-ops",
        "hcloud-ha-web-lb2-ops",
        "hcloud-ha-web-lb1-ready",
        "hcloud-ha-web-lb2-ready",
    }
