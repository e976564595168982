"""``python -m lab.bench_ops`` (in ``make bench``): what observability costs failover.

Prints JSON lines (`lab.measure`), each a distribution over ``--runs`` failovers
(HAProxy on the master SIGKILLed, lb2 takes over, lb1 restarted and preempts again):

* ``ops.failover_to_api_assigned`` with ``webhook=ok`` and ``webhook=hanging``: seconds
  from the kill until the fake Hetzner API shows the floating IP on lb2 and the client's
  route points there, while the alert webhook answers at once / never answers. Equal
  figures mean the alert never delays the failover.
* ``ops.failover_to_metric``: seconds from the kill until a scrape of lb2's node exporter
  (from web1, on the private network) shows ``hcloud_ha_web_vrrp_master`` = 1.
* ``ops.failover_to_webhook``: seconds from the kill until the receiver holds lb2's
  ``became_master`` POST (responsive webhook only).
"""

from __future__ import annotations

import argparse
import time

from components.render import NODE_EXPORTER_PORT
from lab import prom
from lab.cluster import LabCluster, wait_for
from lab.measure import emit_distribution
from lab.netns import requirements_missing
from lab.topology import LabNetwork
from lab.webhook import WebhookReceiver


def _lb2_master_metric(c: LabCluster) -> bool:
    url = f"http://{c.lab['lb2'].private_ip}:{NODE_EXPORTER_PORT}/metrics"
    samples = prom.scrape(c.lab["web1"], url)
    return prom.value(samples, "hcloud_ha_web_vrrp_master", host="lb2") == 1.0


def _one(c: LabCluster, receiver: WebhookReceiver, hanging: bool) -> dict[str, float]:
    receiver.hang = hanging
    posted = len(receiver.kinds())
    t0 = time.monotonic()
    c.kill_haproxy("lb1")
    figures: dict[str, float] = {}
    wait_for(lambda: c.assigned() == "lb2" and c.lab.floating_ip_target() == "lb2", 15, "lb2")
    figures["api"] = time.monotonic() - t0
    wait_for(lambda: _lb2_master_metric(c), 10, "lb2 master metric", step=0.02)
    figures["metric"] = time.monotonic() - t0
    if not hanging:
        wait_for(lambda: ("became_master", "lb2") in receiver.kinds()[posted:], 10, "webhook", 0.02)
        figures["webhook"] = time.monotonic() - t0
    receiver.release()
    c.start_haproxy("lb1")
    c.wait_settled(30)
    time.sleep(1.0)  # let the hooks of lb1's return finish before the next run
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench_ops", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="failovers per condition")
    args = parser.parse_args(argv)
    reason = requirements_missing(("ip", "haproxy", "keepalived", "apache2", "curl"))
    if reason:
        print(f"lab.bench_ops: not run: {reason}")
        return 0
    runs = max(1, min(args.runs, 20))
    with LabNetwork(web_count=2) as lab:
        receiver = WebhookReceiver(lab.api, max_seconds=600)
        try:
            with LabCluster(lab, alert_webhook_url=receiver.url) as c:
                results = {False: [_one(c, receiver, False) for _ in range(runs)]}
                results[True] = [_one(c, receiver, True) for _ in range(runs)]
        finally:
            receiver.close()
    for hanging, label in ((False, "ok"), (True, "hanging")):
        emit_distribution(
            "ops.failover_to_api_assigned",
            [r["api"] for r in results[hanging]],
            "s",
            webhook=label,
        )
    emit_distribution(
        "ops.failover_to_metric", [r["metric"] for r in results[False]], "s", webhook="ok"
    )
    emit_distribution(
        "ops.failover_to_webhook", [r["webhook"] for r in results[False]], "s", webhook="ok"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
