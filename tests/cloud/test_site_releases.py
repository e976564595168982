"""Local cloud: the user's site as atomic, rolling releases on booted Debian 13 and 12.

Per image one `CloudCluster` (lb1, lb2, web1, web2) is provisioned by the program's own
steps with `siteDir` = release A, `webPackages: [libapache2-mod-php]` and an
`apacheConfig` rewriting /old-page to a PHP page. Then, with a request stream through
the floating IP (one new connection every 10 ms): release B, back to A, and a 20,000-file /
200 MB tree. The copies are replayed as CopyToRemote does them
(lab.cloud.apply.replay_copy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from components import site
from lab.cloud.apply import changed
from lab.cloud.cluster import CloudCluster
from lab.cloud.site_rollout import (
    PAGE,
    REWRITE_CONFIG,
    Rollout,
    digest,
    make_big_tree,
    make_release,
    rollout,
)
from lab.traffic import fetch
from tests.cloud.test_provisioned_cluster import lifecycle_lines

if TYPE_CHECKING:
    from tests.cloud.conftest import Bench

pytestmark = pytest.mark.cloud

IMAGES = ("debian-13", "debian-12")
WEBS = ("web1", "web2")
SITE_STEPS = ("site-check", "site-copy", "site")


class Sites:
    def __init__(self, root: Path) -> None:
        self.a = make_release(root / "A", "A")
        self.b = make_release(root / "B", "B")
        self.conf = root / "site.conf"
        self.conf.write_text(REWRITE_CONFIG)


@pytest.fixture(scope="module", params=IMAGES)
def site_cluster(
    request: pytest.FixtureRequest,
    cloud_prefix: str,
    bench: Bench,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[CloudCluster, Sites]]:
    image: str = request.param
    sites = Sites(tmp_path_factory.mktemp(f"sites-{image}"))
    with CloudCluster(
        image,
        site_dir=str(sites.a),
        web_packages=("libapache2-mod-php",),
        apache_config=str(sites.conf),
    ) as c:
        t0 = time.monotonic()
        result = c.apply()
        assert result.ok, result.failure()
        c.wait_settled(60)
        bench.record("site_first_deploy", time.monotonic() - t0, "s", image=image)
        yield c, sites


def get(c: CloudCluster, path: str) -> dict[str, object]:
    """One request through the floating IP, from the client namespace."""
    url = f"{c.url}{path.lstrip('/')}"
    rec: dict[str, object] = c.lab.client.call(lambda: fetch(url, timeout=5.0), timeout=10.0)
    return rec


def body(c: CloudCluster, path: str) -> str:
    r = c.lab.client.run(["curl", "-sS", "-m", "5", "-f", f"{c.url}{path.lstrip('/')}"])
    return r.stdout


def live_release(c: CloudCluster, web: str) -> str:
    """The release `current` leads to on `web`, and what its Apache says it serves."""
    link = c.ssh(web, f"readlink {site.DOCROOT}/current").strip()
    ip = c.lab[web].private_ip
    served = c.ssh(web, f"curl -fsS -m 3 http://{ip}{site.RELEASE_URL}").strip()
    assert link.endswith(served), (web, link, served)
    return served


def site_step_names(c: CloudCluster) -> set[str]:
    assert c.settings is not None
    return {f"{c.settings.cluster_name}-{w}-{s}" for w in WEBS for s in SITE_STEPS}


def check_switch(c: CloudCluster, r: Rollout, old: Path, new: Path) -> None:
    """0 failed requests; every answer wholly old or wholly new; new at the end, on
    every web server; web servers switched one wave after the other."""
    assert r.result.ok, r.result.failure()
    assert r.failed == [], r.failed[:5]
    old_sha, new_sha = digest(old / PAGE), digest(new / PAGE)
    shas = [rec["sha256"] for rec in r.records]
    assert set(shas) <= {old_sha, new_sha}, "an answer was neither release, whole"
    # the stream spanned the switch: the old release before, only the new one after
    assert shas[0] == old_sha and shas[-1] == new_sha
    first_new = shas.index(new_sha)
    assert old_sha not in shas[first_new + len(WEBS) * 50 :], "old release after the switch"
    release = site.tree_hash(new)[:32]
    assert {w: live_release(c, w) for w in WEBS} == {w: release for w in WEBS}
    assert c.settings is not None
    runs = r.result.runs
    name = c.settings.cluster_name
    assert runs[f"{name}-web1-site"].finished <= runs[f"{name}-web2-site"].started, "one wave"


def test_first_deploy_serves_release_a_with_php_and_the_rewrite(
    site_cluster: tuple[CloudCluster, Sites],
) -> None:
    c, sites = site_cluster
    assert get(c, PAGE)["sha256"] == digest(sites.a / PAGE)
    php = body(c, "/page.php")
    assert php.startswith("php-release A "), php  # run by PHP, not sent as source
    assert body(c, "/old-page") == php  # the apacheConfig rewrite
    for web in WEBS:
        assert live_release(c, web) == site.tree_hash(sites.a)[:32]
        # the health check is the program's file, outside every release
        ip = c.lab[web].private_ip
        assert c.ssh(web, f"curl -fsS -m 3 http://{ip}/check.txt").strip() == "ok"
    # the release id is for the private network only, not for the world
    assert get(c, site.RELEASE_URL)["status"] == 403


def test_release_b_rolls_out_under_traffic_and_only_the_site_steps_run(
    site_cluster: tuple[CloudCluster, Sites], bench: Bench
) -> None:
    c, sites = site_cluster
    before = dict(c.applied)
    since = time.time()
    r = rollout(c, sites.b)
    assert changed(r.plan, before) == site_step_names(c)
    assert set(r.result.named("ran")) == site_step_names(c)
    check_switch(c, r, sites.a, sites.b)
    # no daemon was reloaded or restarted for a site change
    for web in WEBS:
        assert lifecycle_lines(c, web, since) == [], web
    # PHP runs the new release's script at once (no stale realpath/opcache entry)
    assert all(body(c, "/page.php").startswith("php-release B ") for _ in range(20))
    bench.record("site_rollout_b", r.result.seconds, "s", image=c.image, requests=len(r.records))


def test_rolling_back_to_a_switches_without_shipping_again(
    site_cluster: tuple[CloudCluster, Sites],
) -> None:
    c, sites = site_cluster
    r = rollout(c, sites.a)
    assert c.settings is not None
    for web in WEBS:
        copy = r.plan[f"{c.settings.cluster_name}-{web}-site-copy"]
        assert Path(copy.source) == site.STUB_DIR, "release A is on the host: not shipped"
    check_switch(c, r, sites.b, sites.a)
    assert body(c, "/page.php").startswith("php-release A ")


def test_a_20000_file_200_mb_tree_deploys(
    site_cluster: tuple[CloudCluster, Sites],
    tmp_path_factory: pytest.TempPathFactory,
    bench: Bench,
) -> None:
    c, _ = site_cluster
    big = make_big_tree(tmp_path_factory.mktemp("big") / "site")
    r = rollout(c, big)
    assert r.result.ok, r.result.failure()
    assert r.failed == [], r.failed[:5]
    release = site.tree_hash(big)[:32]
    sample = big / "d123" / "f12345.bin"
    for web in WEBS:
        assert live_release(c, web) == release
        count = c.ssh(web, f"find {site.DOCROOT}/current/site/ -type f | wc -l").strip()
        assert int(count) == 20_000
        ip = c.lab[web].private_ip
        remote = c.ssh(web, f"curl -fsS -m 5 http://{ip}/d123/f12345.bin | sha256sum")
        assert remote.split()[0] == digest(sample)
    bench.record("site_rollout_200mb", r.result.seconds, "s", image=c.image, files=20_000)
