"""Figures as JSON lines, and distributions over repeated runs (min, median, p90, max).

Every benchmark prints through :func:`emit` so `make bench` output is one format; a
figure measured more than once is reported with :func:`distribution`, never as one run.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from typing import Any


def emit(metric: str, value: Any, unit: str, **extra: Any) -> None:
    """Print one figure as a JSON line: {"metric", "value", "unit", ...extra}."""
    print(json.dumps({"metric": metric, "value": value, "unit": unit, **extra}), flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest-rank: a value that was really measured."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def distribution(values: Sequence[float], digits: int = 3) -> dict[str, float | int]:
    """min, median, p90, max and the number of runs of `values`."""
    if not values:
        raise ValueError("distribution of no values")
    return {
        "n": len(values),
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "p90": round(percentile(values, 90), digits),
        "max": round(max(values), digits),
    }


def emit_distribution(metric: str, values: Sequence[float], unit: str, **extra: Any) -> None:
    """One JSON line whose value is the distribution of `values`."""
    emit(metric, distribution(values), unit, **extra)
