"""``python -m lab.cloud.bench_day2`` (in ``make bench``): day-2 changes on a local cloud
cluster under traffic, as JSON lines (lab.measure).

Per run: a Debian 12 cluster (2 LBs, 3 web servers) is booted and deployed (the
emulated time of a first `pulumi up`: ``day2_first_up``), then the five changes run in
order, each through the program's own resources replayed in the engine's order
(lab.cloud.apply.rollout) while the client sends a request every 20 ms:
a failed activation and its fix, webCount 3 -> 4 -> 2, a serverType change, an
sshPublicKey rotation in two updates, the image debian-12 -> debian-13. Each prints
the time the change took and the requests that failed (plus the most LBs and web
servers seen out at once). Three clusters by default (``--runs N``, 1-5); with more than
one the times are also printed as distributions (min/median/p90/max), with the requests
summed over the runs. Skips loudly where the local cloud cannot run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab.cloud.cluster import CloudCluster
from lab.cloud.common import requirements_missing
from lab.cloud.rolling import DAY2_SITE, Change, rolling_change
from lab.measure import emit, emit_distribution

IMAGE, NEW_IMAGE = "debian-12", "debian-13"


def _new_key(tmp: Path) -> tuple[Path, str]:
    key = tmp / "new"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    return key, key.with_suffix(".pub").read_text().strip()


def one_run(record: Callable[[str, Change], None]) -> float:
    """One cluster, every change in order; returns the first deployment's seconds."""
    with (
        CloudCluster(IMAGE, web_count=3, spare_webs=1, **DAY2_SITE) as c,
        tempfile.TemporaryDirectory() as t,
    ):
        first = c.apply()
        if not first.ok:
            raise RuntimeError(first.failure())
        c.wait_settled(60)
        c.ssh("lb2", "systemctl mask --runtime haproxy")
        try:
            record("day2_failed_activation", rolling_change(c, balance="leastconn"))
        finally:
            c.ssh("lb2", "systemctl unmask --runtime haproxy")
        record("day2_failed_activation_fixed", rolling_change(c, balance="leastconn"))
        record("day2_web_count_3_to_4", rolling_change(c, web_count=4))
        record("day2_web_count_4_to_2", rolling_change(c, web_count=2))
        record("day2_server_type", rolling_change(c, server_type="cpx12"))
        key, public = _new_key(Path(t))
        record("day2_ssh_key_add", rolling_change(c, extra_ssh_public_keys=(public,)))
        assert c.cloud is not None
        c.cloud.key_path.write_text(key.read_text())
        c.cloud.key_path.with_suffix(".pub").write_text(public + "\n")
        record(
            "day2_ssh_key_switch",
            rolling_change(c, ssh_public_key=public, extra_ssh_public_keys=()),
        )
        record("day2_image", rolling_change(c, duration=290, image=NEW_IMAGE))
        return first.seconds


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.cloud.bench_day2", description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="clusters to run the changes on (1-5)")
    args = ap.parse_args(argv)
    reason = requirements_missing()
    if reason:
        print(f"# lab.cloud.bench_day2 skipped: {reason}", file=sys.stderr)
        return 0
    runs = max(1, min(args.runs, 5))
    seconds: dict[str, list[float]] = defaultdict(list)
    totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def record(metric: str, change: Change) -> None:
        extra: dict[str, Any] = {"ok": change.result.ok, **change.figures}
        emit(metric, round(change.seconds, 2), "s", **extra)
        seconds[metric].append(change.seconds)
        for key in ("requests", "failed_requests", "https_requests", "https_failed_requests"):
            totals[metric][key] += int(change.figures.get(key, 0))
        for key in ("most_lbs_out", "most_webs_out"):
            totals[metric][key] = max(totals[metric][key], int(change.figures.get(key, 0)))

    for _ in range(runs):
        first = one_run(record)
        emit("day2_first_up", round(first, 2), "s", image=IMAGE, webs=3)
        seconds["day2_first_up"].append(first)
    if runs > 1:
        for metric, values in seconds.items():
            # requests summed over the runs; the most servers out: the worst run's
            emit_distribution(f"{metric}_distribution", values, "s", **totals.get(metric, {}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
