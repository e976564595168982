"""``python -m lab.site_state``: how much a site adds to the Pulumi state (JSON lines).

Method: the program runs under Pulumi's mocks (lab.program) once without `siteDir` and
once with a generated site of `--megabytes` (incompressible random files plus an HTML
page). Every RegisterResource request is serialized as the SDK sends it to the engine
(protobuf Struct -> JSON): those are the inputs the engine stores in the state, and a
remote resource's outputs repeat its inputs. The engine adds one content hash (64 hex
characters) per archive when it stores a FileArchive ({hash, path}); that is added here.
Figures:

* ``state_inputs_bytes`` (site="none" / "<N> MB"): all registered inputs, serialized;
* ``state_site_delta_bytes``: what the site adds (its resources, path and hash);
* ``state_largest_site_input_bytes``: the largest single input of a site resource.

Deterministic (no timing): one run each is the whole distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pulumi

from components.config import PROJECT, Settings, settings_to_config
from lab.cluster import _lab_ssh_key
from lab.measure import emit
from lab.program import COPY_TYPE, Mocks, RecordingMonitor, install_mocks, run_main

#: The engine stores an archive as {sig, hash (sha256 hex), path}; the SDK sends the path.
ENGINE_HASH_BYTES = len('"hash": ""') + 64


def make_site(root: Path, megabytes: int) -> Path:
    """A site of `megabytes` MiB: 1 MiB random files (nothing compresses) + index.html."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("<h1>big site</h1>\n")
    for i in range(megabytes):
        (root / f"blob-{i:04d}.bin").write_bytes(os.urandom(1 << 20))
    return root


def registered(site_dir: str = "") -> RecordingMonitor:
    """The program's registrations for a production config (defaults), with `site_dir`."""
    monitor = install_mocks(Mocks(), "state")
    settings = Settings(
        ssh_public_key=_lab_ssh_key(), admin_cidrs=("203.0.113.7/32",), site_dir=site_dir
    )
    values = settings_to_config(settings)
    values |= {"sshPrivateKey": "unused-private-key", "failoverToken": "a" * 64}
    config = {f"{PROJECT}:{k}": v for k, v in values.items()}
    pulumi.runtime.set_all_config(config, [f"{PROJECT}:sshPrivateKey", f"{PROJECT}:failoverToken"])
    try:
        run_main()
    finally:
        pulumi.runtime.set_all_config({}, [])
    return monitor


def state_bytes(monitor: RecordingMonitor) -> int:
    total = sum(len(json.dumps(r.wire)) for r in monitor.registrations)
    return total + ENGINE_HASH_BYTES * len(monitor.of_type(COPY_TYPE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    without = state_bytes(registered())
    with tempfile.TemporaryDirectory(prefix="site-state-") as tmp:
        site = make_site(Path(tmp) / "site", args.megabytes)
        size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
        monitor = registered(site_dir=str(site))
        with_site = state_bytes(monitor)
        site_inputs = [
            len(json.dumps(v))
            for r in monitor.registrations
            if "-site" in r.name
            for v in r.wire.values()
        ]
    emit("site_bytes", size, "bytes", site=f"{args.megabytes} MB")
    emit("state_inputs_bytes", without, "bytes", site="none")
    emit("state_inputs_bytes", with_site, "bytes", site=f"{args.megabytes} MB")
    emit("state_site_delta_bytes", with_site - without, "bytes", site=f"{args.megabytes} MB")
    emit("state_largest_site_input_bytes", max(site_inputs), "bytes")


if __name__ == "__main__":
    main()
