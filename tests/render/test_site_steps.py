"""The site steps' shell, run here against a throw-away root, and apacheConfig under
`apache2 -t`.

The steps are the exact scripts `pulumi up` sends (components.site), with a path prefix;
the copy between `site-check` and `site` is done the way CopyToRemote does it (the
directory's content lands at the remote path), and `curl` is a stub answering with the
release id the `current` symlink leads to, as Apache would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from components import site
from tests.render.support import NetnsHost, checker_missing, make_settings
from tests.render.test_render_check import check_host

pytestmark = pytest.mark.skipif(bool(checker_missing()), reason=checker_missing() or "ok")


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host root with a curl that answers like the host's Apache for the release URL."""
    root = tmp_path / "host"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text(
        f"#!/bin/sh\nexec cat {root}{site.DOCROOT}/current/release 2>/dev/null\n"
    )
    (bin_dir / "curl").chmod(0o755)
    health = root / site.DOCROOT.lstrip("/") / "health" / "check.txt"
    health.parent.mkdir(parents=True)
    health.write_text("ok\n")
    placeholder = root / site.DOCROOT.lstrip("/") / "placeholder" / "site" / "index.html"
    placeholder.parent.mkdir(parents=True)
    placeholder.write_text("placeholder page\n")
    return root


def sh(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60
    )


def make_site(tmp_path: Path, label: str) -> Path:
    src = tmp_path / "sites" / label
    (src / "img").mkdir(parents=True)
    (src / "index.html").write_text(f"release {label}\n")
    (src / "img" / "logo.svg").write_text(f"<svg>{label}</svg>\n")
    return src


def release(host: Path, tmp_path: Path, src: Path, keep: int = 3) -> tuple[str, str]:
    """check, copy (the real tree or the stub, as the program chooses), switch."""
    rid = site.tree_hash(src)[:32]
    root = str(host)
    check = sh(site.check_script(rid, root), tmp_path)
    assert check.returncode == 0, check.stderr
    shipped = site.STUB_DIR if site.PRESENT in check.stdout else src
    shutil.copytree(shipped, site.incoming_path(rid, root))
    switch = sh(site.activate_script(rid, keep, "http://unused/", root, ready_timeout=2), tmp_path)
    assert switch.returncode == 0, switch.stdout + switch.stderr
    return rid, check.stdout.strip()


def live(host: Path) -> Path:
    return (host / site.DOCROOT.lstrip("/") / "current").resolve()


def test_releases_switch_prune_and_roll_back_without_shipping_twice(
    host: Path, tmp_path: Path
) -> None:
    docroot = host / site.DOCROOT.lstrip("/")
    ids = {}
    for label in "ABCD":
        ids[label], checked = release(host, tmp_path, make_site(tmp_path, label))
        assert checked == "release-absent", label
        assert (live(host) / "site" / "index.html").read_text() == f"release {label}\n"
        assert live(host) == docroot / "releases" / ids[label]
    # keep=3: A went, B C D stay; nothing half-copied is left behind
    assert sorted(p.name for p in (docroot / "releases").iterdir()) == sorted(ids[x] for x in "BCD")
    assert not (docroot / ".incoming").exists()
    # back to C: found on the host, the stub is shipped instead, the symlink switches
    rid, checked = release(host, tmp_path, tmp_path / "sites" / "C")
    assert (rid, checked) == (ids["C"], site.PRESENT)
    assert (live(host) / "site" / "index.html").read_text() == "release C\n"
    assert not (live(host) / "site" / "README").exists(), "the stub must not enter a release"
    # the health-check file is the program's: no release touched it
    assert (docroot / "health" / "check.txt").read_text() == "ok\n"
    assert (docroot / "current").is_symlink()


def test_a_rerun_of_the_live_release_switches_nothing(host: Path, tmp_path: Path) -> None:
    src = make_site(tmp_path, "A")
    rid, _ = release(host, tmp_path, src)
    current = host / site.DOCROOT.lstrip("/") / "current"
    before = current.lstat()
    shutil.copytree(site.STUB_DIR, site.incoming_path(rid, str(host)))
    again = sh(site.activate_script(rid, 3, "http://unused/", str(host), 2), tmp_path)
    assert again.returncode == 0, again.stderr
    assert "site unchanged" in again.stdout, again.stdout
    assert current.lstat().st_ino == before.st_ino, "the live symlink was replaced"
    # a different release does switch
    release(host, tmp_path, make_site(tmp_path, "B"))
    assert current.lstat().st_ino != before.st_ino


def test_the_placeholder_is_a_release_too(host: Path, tmp_path: Path) -> None:
    release(host, tmp_path, make_site(tmp_path, "A"))
    step = sh(site.activate_script("placeholder", 3, "http://unused/", str(host), 2), tmp_path)
    assert step.returncode == 0, step.stderr
    assert (live(host) / "site" / "index.html").read_text() == "placeholder page\n"


def test_a_host_that_does_not_serve_the_release_fails_the_step(host: Path, tmp_path: Path) -> None:
    (tmp_path / "bin" / "curl").write_text("#!/bin/sh\necho some-other-release\n")
    src = make_site(tmp_path, "A")
    rid = site.tree_hash(src)[:32]
    shutil.copytree(src, site.incoming_path(rid, str(host)))
    step = sh(site.activate_script(rid, 3, "http://unused/", str(host), 1), tmp_path)
    assert step.returncode != 0
    assert f"did not answer with release {rid} within 1s" in step.stderr


def test_a_missing_copy_fails_the_step_and_keeps_the_live_release(
    host: Path, tmp_path: Path
) -> None:
    rid_a, _ = release(host, tmp_path, make_site(tmp_path, "A"))
    step = sh(site.activate_script("f" * 32, 3, "http://unused/", str(host), 1), tmp_path)
    assert step.returncode != 0 and "was not copied" in step.stderr
    assert live(host).name == rid_a


# --- apacheConfig under apache2 -t ------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[NetnsHost]:
    with NetnsHost() as n:
        yield n


def test_an_apache_config_with_rewrite_rules_passes_apache2_t(
    ns: NetnsHost, tmp_path: Path
) -> None:
    conf = tmp_path / "site.conf"
    conf.write_text('RewriteEngine on\nRewriteRule "^/old/(.*)$" "/new/$1" [R=301,L]\n')
    settings = make_settings(apache_config=str(conf))
    check_host(settings, "web1", ns, tmp_path)


def test_a_bad_apache_config_is_rejected_by_apache2_t(ns: NetnsHost, tmp_path: Path) -> None:
    conf = tmp_path / "site.conf"
    conf.write_text("RewriteEngine on\nNotADirective here\n")
    settings = make_settings(apache_config=str(conf))
    with pytest.raises(AssertionError, match="NotADirective"):
        check_host(settings, "web1", ns, tmp_path)
