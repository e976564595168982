"""The user's site: checks on the local directory, its content hash, and the release steps.

A release travels as a `pulumi.FileArchive` of `siteDir` (`remote.CopyToRemote`), so the
engine hashes it and only that hash and the path reach the state. On each web server:

    {DOCROOT}/current            -> releases/<hash> (or placeholder): Apache's document
                                    root is current/site, so one rename(2) of this symlink
                                    switches every later request to the new release
    {DOCROOT}/releases/<hash>/   site/ (the user's files) + release (the hash)
    {DOCROOT}/placeholder/       the page naming the host, while no siteDir is set
    {DOCROOT}/health/            the health-check file (Alias): never part of a release
    {DOCROOT}/.incoming/<hash>   where CopyToRemote puts a release before it is unpacked

Three steps per web server: `site-check` (is the release already on the host?), the
copy (the real tree, or a one-file stub when the release is there already) and `site`
(move it into releases/, switch the symlink, keep the last N, and wait until the local
Apache answers with the new release).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
DOCROOT = "/var/www/hcloud-ha-web"
#: URL path under which each web server tells the id of the release it serves.
RELEASE_URL = "/.hcloud-ha-web/release"
#: What `site-check` prints when the release is already unpacked on the host.
PRESENT = "release-present"
#: Shipped instead of the site when the host already holds the release (a tiny tree).
STUB_DIR = PROJECT_DIR / "templates" / "www" / "release-stub"
PLACEHOLDER = "placeholder"
#: Bounded wait for the local Apache to answer with the new release (seconds).
READY_TIMEOUT = 60


def project_path(value: str) -> Path:
    """`value` as a path: absolute as given, relative to the project directory."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else PROJECT_DIR / path


def site_problem(root: Path, reserved: tuple[str, ...]) -> str | None:
    """Why `root` cannot be shipped as a site (a fix for the user), or None.

    `reserved` are URL paths the program serves itself (the health check, the release
    id): a site file there would never be seen.
    """
    if not root.is_dir():
        return f"{root} is not a directory; give the directory holding your site's files"
    real_root = Path(os.path.realpath(root))
    files = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = Path(os.path.realpath(path))
                if not target.exists():
                    return f"symbolic link {rel} points nowhere; remove it or fix its target"
                if target != real_root and real_root not in target.parents:
                    return (
                        f"symbolic link {rel} points outside the directory ({target}); "
                        "copy the file in instead"
                    )
                if target.is_file():
                    files += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                if not os.access(path, os.R_OK | os.X_OK):
                    return f"directory {rel} is not readable; chmod it"
                continue
            if not stat.S_ISREG(st.st_mode):
                return f"{rel} is not a regular file (a device, socket or pipe); remove it"
            try:
                with path.open("rb"):
                    pass
            except OSError as err:
                return f"file {rel} is not readable ({err.strerror}); chmod it"
            files += 1
    if files == 0:
        return f"{root} holds no files; put your site there (e.g. an index.html)"
    for url in reserved:
        if os.path.lexists(root / url.lstrip("/")):
            return f"the site has a file at {url}, a path the program serves itself; rename it"
    return None


def tree_hash(root: Path) -> str:
    """Hash of the names, executable bits, link targets and contents under `root`.

    Equal trees give equal hashes wherever they live, so a release is named by its
    content and setting `siteDir` back to an earlier content finds that release.
    """
    digest = hashlib.sha256()
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            entries.append((path.relative_to(root).as_posix(), path))
    for rel, path in sorted(entries):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            digest.update(f"L\0{rel}\0{os.readlink(path)}\0".encode())
        elif stat.S_ISDIR(st.st_mode):
            digest.update(f"D\0{rel}\0".encode())
        else:
            executable = "x" if st.st_mode & 0o111 else "-"
            file_digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    file_digest.update(chunk)
            digest.update(f"F\0{rel}\0{executable}\0{file_digest.hexdigest()}\0".encode())
    return digest.hexdigest()


def release_id(site_dir: str) -> str:
    """The id of the release `site_dir` makes ("placeholder" when unset)."""
    return tree_hash(project_path(site_dir))[:32] if site_dir else PLACEHOLDER


def incoming_path(release: str, root: str = "") -> str:
    return f"{root}{DOCROOT}/.incoming/{release}"


def check_script(release: str, root: str = "") -> str:
    """`site-check`: prints PRESENT when the release is unpacked on the host already;
    otherwise clears a half-copied leftover so the copy lands at a fresh path."""
    base = shlex.quote(f"{root}{DOCROOT}")
    return f"""set -eu
base={base}
if [ -f "$base/releases/{release}/release" ]; then
  echo {PRESENT}
else
  rm -rf "$base/.incoming/{release}"
  mkdir -p "$base/.incoming"
  echo release-absent
fi
"""


def activate_script(
    release: str, keep: int, probe_url: str, root: str = "", ready_timeout: int = READY_TIMEOUT
) -> str:
    """`site`: unpack (a rename), switch `current` atomically, prune, wait until served.

    `probe_url` is this host's own URL of RELEASE_URL; the step ends when it answers
    with `release`, so the next wave starts only after this host serves it.
    """
    base = shlex.quote(f"{root}{DOCROOT}")
    if release == PLACEHOLDER:
        unpack = (
            '[ -f "$base/placeholder/site/index.html" ] || { echo "no placeholder" >&2; exit 1; }\n'
            "printf '%s\\n' placeholder > \"$base/placeholder/release\""
        )
        target = "placeholder"
    else:
        unpack = f"""rel="$base/releases/{release}"
if [ ! -f "$rel/release" ]; then
  inc="$base/.incoming/{release}"
  [ -d "$inc" ] || {{ echo "hcloud-ha-web: release {release} was not copied to $inc" >&2; exit 1; }}
  rm -rf "$rel.new" && mkdir -p "$rel.new"
  chown -R root:root "$inc" && chmod -R u+rwX,go+rX,go-w "$inc"
  mv "$inc" "$rel.new/site"
  printf '%s\\n' {release} > "$rel.new/release"
  mv -T "$rel.new" "$rel"
fi
rm -rf "$base/.incoming"
touch "$rel\""""
        target = f"releases/{release}"
    return f"""set -eu
base={base}
mkdir -p "$base/releases"
{unpack}
# One rename(2) of a symlink: a request resolves either the old or the new release.
state=switched
if [ "$(readlink "$base/current" 2>/dev/null)" = {target} ]; then
  state=unchanged  # a re-run of the same release: nothing to switch
else
  ln -sfn {target} "$base/current.new"
  mv -T "$base/current.new" "$base/current"
fi
# Keep the newest {keep} releases (the live one always).
ls -1t "$base/releases" | grep -Ex '[0-9a-f]{{32}}' | tail -n +{keep + 1} | while read -r old; do
  [ "releases/$old" = {target} ] || rm -rf "$base/releases/$old"
done
# Ready when this host's Apache answers with the new release (bounded wait).
for _ in $(seq 1 {ready_timeout * 5}); do
  if [ "$(curl -fsS --max-time 2 {shlex.quote(probe_url)} 2>/dev/null)" = {release} ]; then
    echo "hcloud-ha-web: site $state, serving release {release}"
    exit 0
  fi
  sleep 0.2
done
echo "hcloud-ha-web: Apache did not answer with release {release} within {ready_timeout}s" >&2
exit 1
"""
