"""Site releases on the local cloud: sample sites, and a rollout under client traffic.

Used by the cloud tier (tests/cloud/test_site_releases.py) and `make bench`
(lab.cloud.bench_site). A rollout changes `siteDir` in the cluster's settings, runs the
program under mocks for the new steps, and applies what changed over SSH while a
request stream (lab.traffic, one new connection per request) goes through the
floating IP; the records say which content answered each request (its sha256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.cloud.apply import ApplyResult
from lab.cloud.cluster import CloudCluster
from lab.program import RemoteStep
from lab.traffic import TrafficStream

#: Included in the virtual host: /old-page is served by page.php.
REWRITE_CONFIG = 'RewriteEngine on\nRewriteRule "^/old-page$" "/page.php" [PT,L]\n'
PAGE = "index.html"


def make_release(root: Path, label: str, padding: int = 64 * 1024) -> Path:
    """A small site whose every file names `label`; index.html is large enough (64 KiB)
    that a half-copied or mixed file could not pass for a whole one."""
    (root / "assets").mkdir(parents=True, exist_ok=True)
    filler = "".join(f"<!-- {label} {i:06d} -->\n" for i in range(padding // 22))
    (root / PAGE).write_text(f'<!doctype html>\n<p id="release">{label}</p>\n{filler}')
    (root / "assets" / "site.css").write_text(f"/* {label} */ body {{ color: black }}\n")
    (root / "page.php").write_text(f'<?php echo "php-release {label} ", PHP_MAJOR_VERSION; ?>\n')
    return root


def make_big_tree(root: Path, files: int = 20_000, total_bytes: int = 200 * 2**20) -> Path:
    """`files` incompressible files of `total_bytes` in all, 100 per directory, plus an
    index.html."""
    size = total_bytes // files
    for i in range(files - 1):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}.bin").write_bytes(os.urandom(size))
    (root / PAGE).write_text('<p id="release">big</p>\n')
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Rollout:
    plan: dict[str, RemoteStep]
    result: ApplyResult
    records: list[dict[str, Any]]
    started: float
    """time.time() before the apply began."""

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if not r["ok"]]


def rollout(
    c: CloudCluster,
    site_dir: Path,
    *,
    page: str = PAGE,
    interval: float = 0.01,
    settle: float = 1.0,
) -> Rollout:
    """Set `siteDir` to `site_dir` and apply what changed under a request stream for
    `page` through the floating IP (from `settle` s before to `settle` s after)."""
    assert c.settings is not None
    c.settings = dataclasses.replace(c.settings, site_dir=str(site_dir))
    plan = c.plan()
    stream = TrafficStream(
        c.lab.client, f"{c.url}{page}", count=50_000, duration=290, interval=interval, timeout=2.0
    )
    try:
        stream.wait_started()
        time.sleep(settle)
        started = time.time()
        result = c.apply(plan)
        time.sleep(settle)
    finally:
        records = stream.stop()
    return Rollout(plan, result, records, started)
