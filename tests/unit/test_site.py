"""The site release under Pulumi mocks: settings, steps, archive, waves, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pulumi
import pytest

from components import site
from components.config import PROJECT, SettingsError, settings_to_config
from components.render import PACKAGES
from tests.conftest import (
    ROOT,
    STACK,
    Mocks,
    RecordingMonitor,
    find_plaintext,
    install_mocks,
    make_settings,
    run_main,
    valid_config,
)

COMMAND = "command:remote:Command"
COPY = "command:remote:CopyToRemote"
SENTINEL = "SiteSentinel-7f3e9c1d-never-in-state"


def site_tree(root: Path, marker: str = "A") -> Path:
    (root / "css").mkdir(parents=True)
    (root / "index.html").write_text(f"<h1>release {marker}</h1><!-- {SENTINEL} -->\n")
    (root / "css" / "site.css").write_text("body { color: black }\n")
    (root / "home.html").symlink_to("index.html")
    return root


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    return site_tree(tmp_path / "site")


def deploy(monitor: RecordingMonitor, **overrides: Any) -> dict[str, Any]:
    """Run the whole program with `overrides` as stack config; registrations by name."""
    monitor.registrations.clear()
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    run_main()
    return {r.name: r for r in monitor.registrations}


def waits_for(regs: dict[str, Any], reg: Any) -> set[str]:
    """URNs `reg` waits for, directly or through its dependencies."""
    by_urn = {r.urn: r for r in regs.values()}
    seen: set[str] = set()
    todo = list(reg.dependencies)
    for _ in range(sum(len(r.dependencies) for r in by_urn.values()) + 1):
        if not todo:
            break
        urn = todo.pop()
        if urn not in seen:
            seen.add(urn)
            todo += by_urn[urn].dependencies if urn in by_urn else []
    return seen


def web_step_names(regs: dict[str, Any], host: str) -> list[str]:
    return [n for n in regs if n.startswith(f"hcloud-ha-web-{host}-")]


# --- with and without siteDir -----------------------------------------------------------


def test_without_site_dir_each_web_server_switches_to_the_placeholder(
    monitor: RecordingMonitor,
) -> None:
    regs = deploy(monitor)
    assert not [r for r in regs.values() if r.type == COPY]
    for host in ("web1", "web2"):
        step = regs[f"hcloud-ha-web-{host}-site"]
        assert step.inputs["triggers"][1:] == ["placeholder"]
        assert "ln -sfn placeholder" in step.inputs["create"]
        assert f"hcloud-ha-web-{host}-site-check" not in regs
    assert "hcloud-ha-web-lb1-site" not in regs


def test_with_site_dir_the_release_is_a_file_archive_copied_to_its_hash(
    monitor: RecordingMonitor, site_dir: Path
) -> None:
    regs = deploy(monitor, siteDir=str(site_dir))
    release = site.release_id(str(site_dir))
    for host in ("web1", "web2"):
        check = regs[f"hcloud-ha-web-{host}-site-check"]
        copy = regs[f"hcloud-ha-web-{host}-site-copy"]
        step = regs[f"hcloud-ha-web-{host}-site"]
        assert copy.type == COPY
        source = copy.inputs["source"]
        assert isinstance(source, pulumi.FileArchive) and source.path == str(site_dir)
        assert copy.inputs["remotePath"] == f"/var/www/hcloud-ha-web/.incoming/{release}"
        assert check.urn in copy.dependencies and copy.urn in step.dependencies
        apache = regs[f"hcloud-ha-web-{host}-apache"]
        assert apache.urn in waits_for(regs, step), "the vhost must exist before a switch"
        assert f"releases/{release}" in step.inputs["create"]
        for r in (check, copy, step):
            assert r.inputs["triggers"] == [regs[f"hcloud-ha-web-{host}"].id, release]


def test_no_site_content_reaches_any_resource_input(
    monitor: RecordingMonitor, site_dir: Path
) -> None:
    """The archive is sent as a path for the engine to hash: the content never is."""
    regs = deploy(monitor, siteDir=str(site_dir))
    assert SENTINEL in (site_dir / "index.html").read_text()  # the probe has something to find
    for reg in regs.values():
        assert find_plaintext(reg.wire, SENTINEL) == [], reg.name
        assert SENTINEL not in json.dumps(reg.wire), reg.name  # not even inside a secret


def test_a_one_file_change_changes_the_hash_and_only_the_site_steps(
    monitor: RecordingMonitor, site_dir: Path
) -> None:
    before = deploy(monitor, siteDir=str(site_dir))
    old_release = site.release_id(str(site_dir))
    (site_dir / "css" / "site.css").write_text("body { color: navy }\n")
    after = deploy(monitor, siteDir=str(site_dir))
    assert site.release_id(str(site_dir)) != old_release
    assert set(before) == set(after)
    changed = {n for n in before if before[n].wire != after[n].wire}
    assert changed == {
        f"hcloud-ha-web-{h}-{s}"
        for h in ("web1", "web2")
        for s in ("site-check", "site-copy", "site")
    }
    # the same content again gives the same inputs everywhere (nothing re-runs)
    again = deploy(monitor, siteDir=str(site_dir))
    assert {n for n in after if after[n].wire != again[n].wire} == set()


def test_equal_trees_have_equal_releases_wherever_they_live(tmp_path: Path) -> None:
    a = site_tree(tmp_path / "a")
    b = site_tree(tmp_path / "b")
    assert site.tree_hash(a) == site.tree_hash(b)
    (b / "css" / "site.css").chmod(0o755)  # an executable bit is content too
    assert site.tree_hash(a) != site.tree_hash(b)


def test_releases_roll_in_waves_and_never_all_at_once(
    monitor: RecordingMonitor, site_dir: Path
) -> None:
    regs = deploy(monitor, siteDir=str(site_dir), webCount="4")
    switch = {h: regs[f"hcloud-ha-web-{h}-site"] for h in ("web1", "web2", "web3", "web4")}
    # waves (web1, web2), (web3, web4): a wave waits for every switch of the one before
    for later in ("web3", "web4"):
        for earlier in ("web1", "web2"):
            assert switch[earlier].urn in switch[later].dependencies
    assert switch["web1"].urn not in switch["web2"].dependencies
    assert switch["web3"].urn not in switch["web4"].dependencies
    # the copies do not wait for earlier waves: every host receives in parallel
    copies = [regs[f"hcloud-ha-web-{h}-site-copy"] for h in switch]
    for copy in copies:
        assert not {s.urn for s in switch.values()} & set(copy.dependencies)


def test_each_switch_waits_until_its_host_serves_the_new_release(
    monitor: RecordingMonitor, site_dir: Path
) -> None:
    regs = deploy(monitor, siteDir=str(site_dir))
    release = site.release_id(str(site_dir))
    script = regs["hcloud-ha-web-web2-site"].inputs["create"]
    assert f"curl -fsS --max-time 2 http://10.0.1.22{site.RELEASE_URL}" in script
    assert f"= {release} ]" in script


class PresentMocks(Mocks):
    """A provider whose site-check finds the release on the host already."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict]:
        rid, outputs = super().new_resource(args)
        if args.typ == COMMAND and args.name.endswith("-site-check"):
            outputs["stdout"] = site.PRESENT
        return rid, outputs


@pytest.fixture
def present_monitor() -> Iterator[RecordingMonitor]:
    mon = install_mocks(PresentMocks(), STACK)
    yield mon
    pulumi.runtime.set_all_config({}, [])


def test_a_release_the_host_holds_is_not_shipped_again(
    present_monitor: RecordingMonitor, site_dir: Path
) -> None:
    regs = deploy(present_monitor, siteDir=str(site_dir))
    for host in ("web1", "web2"):
        source = regs[f"hcloud-ha-web-{host}-site-copy"].inputs["source"]
        assert isinstance(source, pulumi.FileArchive)
        assert Path(source.path) == site.STUB_DIR
        assert sum(f.stat().st_size for f in site.STUB_DIR.rglob("*")) < 1024


def test_web_packages_go_to_the_web_base_step_only(monitor: RecordingMonitor) -> None:
    regs = deploy(monitor, webPackages=json.dumps(["libapache2-mod-php", "php-sqlite3"]))
    for host in ("web1", "web2"):
        assert (
            " ".join((*PACKAGES["web"], "libapache2-mod-php", "php-sqlite3")) + "\n"
            in (regs[f"hcloud-ha-web-{host}-base"].inputs["create"])
        )
    assert "libapache2-mod-php" not in regs["hcloud-ha-web-lb1-base"].inputs["create"]


def test_apache_config_changes_the_apache_step_not_the_site(
    monitor: RecordingMonitor, tmp_path: Path
) -> None:
    conf = tmp_path / "site.conf"
    conf.write_text("RewriteEngine on\n")
    before = deploy(monitor, apacheConfig=str(conf))
    conf.write_text('RewriteEngine on\nRewriteRule "^/old$" "/new" [R=301]\n')
    after = deploy(monitor, apacheConfig=str(conf))
    changed = {n for n in before if before[n].wire != after[n].wire}
    assert changed == {
        "hcloud-ha-web-web1-apache",
        "hcloud-ha-web-web2-apache",
        # the day-2 readiness checks of the changed web servers run again
        *(f"hcloud-ha-web-{w}-ready-{lb}" for w in ("web1", "web2") for lb in ("lb1", "lb2")),
    }


def test_relative_paths_are_relative_to_the_project(monitor: RecordingMonitor) -> None:
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        site_tree(Path(tmp) / "s")
        relative = os.path.relpath(Path(tmp) / "s", ROOT)
        regs = deploy(monitor, siteDir=relative)
        source = regs["hcloud-ha-web-web1-site-copy"].inputs["source"]
        assert Path(source.path) == Path(tmp) / "s"


def test_site_settings_round_trip(tmp_path: Path) -> None:
    settings = make_settings(
        site_dir=str(site_tree(tmp_path / "s")),
        site_releases=5,
        web_packages=("libapache2-mod-php",),
    )
    raw = settings_to_config(settings)
    assert raw["siteDir"] == str(tmp_path / "s") and raw["siteReleases"] == "5"
    assert json.loads(raw["webPackages"]) == ["libapache2-mod-php"]


# --- bad input, before any resource -------------------------------------------------------


def _outside(tmp: Path) -> Path:
    root = site_tree(tmp / "site")
    (tmp / "secret.txt").write_text("outside\n")
    (root / "leak.txt").symlink_to(tmp / "secret.txt")
    return root


def _fifo(tmp: Path) -> Path:
    root = site_tree(tmp / "site")
    os.mkfifo(root / "pipe")
    return root


def _empty(tmp: Path) -> Path:
    root = tmp / "site"
    (root / "only" / "dirs").mkdir(parents=True)
    return root


def _dangling(tmp: Path) -> Path:
    root = site_tree(tmp / "site")
    (root / "gone.html").symlink_to(root / "nothing-here")
    return root


def _health_file(tmp: Path) -> Path:
    root = site_tree(tmp / "site")
    (root / "check.txt").write_text("mine\n")
    return root


def _release_file(tmp: Path) -> Path:
    root = site_tree(tmp / "site")
    (root / ".hcloud-ha-web").mkdir()
    (root / ".hcloud-ha-web" / "release").write_text("x\n")
    return root


def _a_file(tmp: Path) -> Path:
    (tmp / "index.html").write_text("hi\n")
    return tmp / "index.html"


def _binary_conf(tmp: Path) -> Path:
    (tmp / "bad.conf").write_bytes(b"\xff\xfe Rewrite\n")
    return tmp / "bad.conf"


BAD_SITE = [
    ("missing dir", lambda t: t / "no-such-dir", "siteDir", "not a directory"),
    ("a file, not a dir", _a_file, "siteDir", "not a directory"),
    ("empty dir", _empty, "siteDir", "holds no files"),
    ("link outside", _outside, "siteDir", "points outside"),
    ("dangling link", _dangling, "siteDir", "points nowhere"),
    ("a pipe", _fifo, "siteDir", "not a regular file"),
    ("file at the health check", _health_file, "siteDir", "/check.txt"),
    ("file at the release id", _release_file, "siteDir", site.RELEASE_URL),
]


@pytest.mark.parametrize(
    ("make", "key", "shown"), [pytest.param(m, k, s, id=c) for c, m, k, s in BAD_SITE]
)
def test_a_bad_site_dir_fails_naming_the_key_before_any_resource(
    monitor: RecordingMonitor, tmp_path: Path, make: Any, key: str, shown: str
) -> None:
    path = make(tmp_path)
    config, secret_keys = valid_config(siteDir=str(path))
    pulumi.runtime.set_all_config(config, secret_keys)
    with pytest.raises(SettingsError) as raised:
        run_main()
    assert raised.value.key == key and f"'{PROJECT}:{key}'" in str(raised.value)
    assert shown in str(raised.value)
    assert monitor.registrations == []


BAD_VALUES = [
    ("package with capitals", {"webPackages": json.dumps(["LibApache2-Mod-PHP"])}, "webPackages"),
    ("package with a space", {"webPackages": json.dumps(["php curl"])}, "webPackages"),
    ("package with shell", {"webPackages": json.dumps(["php;reboot"])}, "webPackages"),
    ("one-letter package", {"webPackages": json.dumps(["a"])}, "webPackages"),
    ("package with arch", {"webPackages": json.dumps(["php:amd64"])}, "webPackages"),
    ("package starting with -", {"webPackages": json.dumps(["-php"])}, "webPackages"),
    ("missing apacheConfig", {"apacheConfig": "/nonexistent/site.conf"}, "apacheConfig"),
    ("apacheConfig a dir", {"apacheConfig": "/etc"}, "apacheConfig"),
    ("one release kept", {"siteReleases": "1"}, "siteReleases"),
    ("too many releases", {"siteReleases": "21"}, "siteReleases"),
]


@pytest.mark.parametrize(("overrides", "key"), [pytest.param(o, k, id=c) for c, o, k in BAD_VALUES])
def test_bad_site_settings_fail_naming_the_key_before_any_resource(
    monitor: RecordingMonitor, overrides: dict[str, str], key: str
) -> None:
    config, secret_keys = valid_config(**overrides)
    pulumi.runtime.set_all_config(config, secret_keys)
    with pytest.raises(SettingsError) as raised:
        run_main()
    assert raised.value.key == key
    assert monitor.registrations == []


def test_an_apache_config_that_is_not_text_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="UTF-8") as raised:
        make_settings(apache_config=str(_binary_conf(tmp_path)))
    assert raised.value.key == "apacheConfig"


def test_good_values_pass_the_same_checks(tmp_path: Path) -> None:
    """Guards the table above: each value is refused for its own fault only."""
    conf = tmp_path / "ok.conf"
    conf.write_text("RewriteEngine on\n")
    s = make_settings(
        site_dir=str(site_tree(tmp_path / "s")),
        web_packages=("libapache2-mod-php", "php8.2-sqlite3", "g++"),
        apache_config=str(conf),
        site_releases=2,
    )
    assert s.apache_config_text == "RewriteEngine on\n"


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to check as another user")
def test_an_unreadable_file_is_refused_for_a_user_who_cannot_read_it() -> None:
    """Root reads every file, so this runs the check as `nobody`, the way a non-root
    `pulumi up` would see the tree."""
    tmp = Path(tempfile.mkdtemp(prefix="site-unreadable-"))
    try:
        tmp.chmod(0o755)
        root = site_tree(tmp / "site")
        for p in [root, *root.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        # The module uses the standard library only: a copy runs under the system Python
        # (the venv and the worktree need not be open to nobody).
        shutil.copy(site.__file__, tmp / "site_check.py")
        (tmp / "site_check.py").chmod(0o644)
        code = (
            "import sys; from pathlib import Path; from site_check import site_problem;"
            "print(site_problem(Path(sys.argv[1]), ('/check.txt',)))"
        )

        def check() -> str:
            return subprocess.run(
                [
                    SYSTEM_PYTHON,
                    "-I",
                    "-c",
                    f"import sys; sys.path.insert(0, {str(tmp)!r}); {code}",
                    str(root),
                ],
                cwd=tmp,
                user=65534,
                group=65534,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()

        assert check() == "None"  # readable as nobody: the probe works
        (root / "css" / "site.css").chmod(0o600)
        assert "css/site.css is not readable" in check()
    finally:
        shutil.rmtree(tmp)
