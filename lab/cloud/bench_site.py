"""``python -m lab.cloud.bench_site`` (``make bench``): site release rollouts, JSON lines.

One local cloud cluster (Debian 13: lb1, lb2, web1, web2, provisioned by the program's
steps) serves a small site. Then, under a request stream through the floating IP (one
new connection every 10 ms, lab.traffic), `--runs` times each:

* ``site_rollout_one_file``: one file of the small site changes; the apply of the new
  release (check, copy, switch in two waves, each ending when its server answers with
  the new release), in seconds;
* ``site_rollout_200mb``: one file of a 20,000-file / 200 MB tree changes, so the whole
  tree is a new release and is copied to both web servers again;
* ``site_rollout_failed_requests`` (per kind): failed requests during each rollout.

Figures are distributions (min, median, p90, max, n). Run it under
``flock /work/team/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lab.cloud import CloudError
from lab.cloud.cluster import CloudCluster
from lab.cloud.site_rollout import make_big_tree, make_release, rollout
from lab.measure import emit, emit_distribution


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.cloud.bench_site", description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="debian-13", choices=("debian-13", "debian-12"))
    args = parser.parse_args(argv)
    runs = max(1, min(args.runs, 20))
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        small = make_release(Path(tmp) / "small", "A")
        big = make_big_tree(Path(tmp) / "big")
        with CloudCluster(args.image, site_dir=str(small)) as c:
            first = c.apply()
            if not first.ok:
                print(first.failure(), file=sys.stderr)
                return 1
            c.wait_settled(60)
            for kind, tree, changed_file in (
                ("one_file", small, small / "assets" / "site.css"),
                ("200mb", big, big / "d000" / "f00000.bin"),
            ):
                seconds: list[float] = []
                failed: list[float] = []
                requests = 0
                original = changed_file.read_bytes()
                for run in range(runs):
                    changed_file.write_bytes(original + f"/* run {run} */\n".encode())
                    r = rollout(c, tree)
                    if not r.result.ok:
                        print(r.result.failure(), file=sys.stderr)
                        return 1
                    seconds.append(r.result.seconds)
                    failed.append(len(r.failed))
                    requests += len(r.records)
                emit_distribution(f"site_rollout_{kind}", seconds, "s", webs=2, image=args.image)
                emit_distribution(
                    "site_rollout_failed_requests",
                    failed,
                    "requests",
                    kind=kind,
                    requests_total=requests,
                )
            emit("site_200mb_tree", {"files": 20_000, "bytes": 200 * 2**20}, "tree")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except CloudError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None
