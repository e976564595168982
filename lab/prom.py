"""Scrape a Prometheus endpoint from inside a lab namespace and read its samples.

``scrape(host, url)`` runs curl in ``host``'s namespace (so the request leaves from that
host's addresses) and parses the text exposition format into ``Samples``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lab.netns import Host, LabError

_SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = _SAMPLE_RE.fullmatch(line.strip())
        if m is None:
            raise LabError(f"not a Prometheus sample line: {line[:200]!r}")
        labels = dict(_LABEL_RE.findall(m.group(2) or ""))
        samples.append(Sample(m.group(1), labels, float(m.group(3))))
    return samples


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The one sample named ``name`` whose labels include ``labels`` (None if absent)."""
    found = [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    if len(found) > 1:
        raise LabError(f"{len(found)} samples match {name}{labels}")
    return found[0].value if found else None


def scrape(host: Host, url: str, timeout: float = 10.0) -> list[Sample]:
    proc = host.run(
        ["curl", "-fsS", "--max-time", str(timeout), url], check=False, timeout=timeout + 3
    )
    if proc.returncode != 0:
        raise LabError(f"scrape of {url} from {host.name} failed: {proc.stderr.strip()}")
    return parse(proc.stdout)


def probe(host: Host, url: str, timeout: float = 2.0) -> int:
    """curl's exit code for ``url`` from ``host`` (0: something answered with HTTP)."""
    proc = host.run(["curl", "-sS", "-o", "/dev/null", "--max-time", str(timeout), url],
                    check=False, timeout=timeout + 3)  # fmt: skip
    return proc.returncode
