"""The chaos soak (lab.soak) in CI: a short run must break no invariant.

It runs as its own process, as `make soak` does, and must cover every fault kind
(each kind comes once before any repeats) and report no broken invariant.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.soak import KINDS

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent.parent
SOAK_SECONDS = 60


def test_short_chaos_soak_breaks_no_invariant() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lab.soak", "--duration", str(SOAK_SECONDS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SOAK_SECONDS + 240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    figures = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            figures[rec["metric"]] = rec["value"]
    assert "soak_invariants_broken" in figures, out[-3000:]
    assert figures["soak_invariants_broken"] == [], out[-6000:]
    assert proc.returncode == 0, out[-3000:]
    covered = {k for k in KINDS if f"soak_failed_requests_{k}" in figures}
    assert covered == set(KINDS), (covered, out[-3000:])
    assert figures["soak_failed_requests_web_crash"]["max"] == 0, figures
