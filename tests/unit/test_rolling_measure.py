"""The shared seams: web-server waves and benchmark distributions."""

import pytest

from components.rolling import web_waves
from lab.measure import distribution, percentile


@pytest.mark.parametrize(
    ("count", "share", "expected"),
    [
        (1, 0.5, [["w1"]]),
        (2, 0.5, [["w1"], ["w2"]]),
        (3, 0.5, [["w1"], ["w2"], ["w3"]]),
        (4, 0.5, [["w1", "w2"], ["w3", "w4"]]),
        (5, 0.5, [["w1", "w2"], ["w3", "w4"], ["w5"]]),
        (4, 1.0, [["w1", "w2", "w3"], ["w4"]]),
        (10, 0.2, [["w1", "w2"], ["w3", "w4"], ["w5", "w6"], ["w7", "w8"], ["w9", "w10"]]),
    ],
)
def test_web_waves_never_take_every_server_out(count, share, expected):
    names = [f"w{i}" for i in range(1, count + 1)]
    waves = web_waves(names, share)
    assert [list(w) for w in waves] == expected


@pytest.mark.parametrize("share", [0, -0.1, 1.5])
def test_web_waves_refuse_a_share_outside_zero_to_one(share):
    with pytest.raises(ValueError, match="max_unavailable"):
        web_waves(["w1", "w2"], share)


def test_distribution_reports_measured_values():
    values = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.4, 0.8, 0.6, 1.0]
    assert distribution(values) == {"n": 10, "min": 0.1, "median": 0.55, "p90": 0.9, "max": 1.0}
    assert percentile([3.0], 90) == 3.0
    with pytest.raises(ValueError):
        distribution([])
