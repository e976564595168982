"""The site's resources per web server: `site-check`, `site-copy`, `site` (see site.py).

A wave's `site` steps wait for every `site` step of the previous wave
(`components.rolling.web_waves`), so the web servers never all switch at the same
moment, and a wave ends only when its servers answer with the new release. The copies
do not wait for earlier waves: every host receives its release in parallel, and only
the switch rolls. None of these steps depends on anything that changes with the site,
and nothing else depends on the site's content, so a site change re-runs only them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_hcloud as hcloud
from pulumi_command import remote

from components import site
from components.config import StackConfig
from components.rolling import web_waves

#: Name suffix of the step whose stdout decides what the copy ships.
CHECK_STEP_SUFFIX = "-site-check"


@dataclass(frozen=True)
class WebHost:
    """One web server and the steps its site steps follow."""

    server: hcloud.Server
    last: pulumi.Resource
    """The host's last provisioning step (Apache and its virtual host are in place)."""


def site_steps(
    *,
    parent: pulumi.Resource,
    name: str,
    stack: StackConfig,
    webs: Mapping[str, WebHost],
    previous: Sequence[pulumi.Resource] = (),
    private_key: pulumi.Input[str] | None = None,
) -> dict[str, list[pulumi.Resource]]:
    """The site steps of every web server in `webs`, per server, in order. The first
    wave switches after `previous` (the switches of the wave before, when the caller
    creates the web servers' steps one server at a time).

    `private_key`: the stack's SSH key (a generated one is not in `stack`)."""
    settings = stack.settings
    release = site.release_id(settings.site_dir)
    site_path = settings.site_path
    out: dict[str, list[pulumi.Resource]] = {}
    previous_wave: list[pulumi.Resource] = list(previous)
    waves = web_waves([h for h in settings.web_names if h in webs], settings.web_max_unavailable)
    for wave in waves:
        this_wave: list[pulumi.Resource] = []
        for host in wave:
            web = webs[host]
            # The server id: a replaced server gets the release again.
            triggers: list[pulumi.Input[str]] = [web.server.id, release]
            connection = remote.ConnectionArgs(
                host=web.server.ipv4_address,
                user="root",
                private_key=private_key
                if private_key is not None
                else stack.secrets.ssh_private_key,
                dial_error_limit=30,
                per_dial_timeout=10,
            )
            out[host] = []
            after: list[pulumi.Resource] = [web.last, *previous_wave]
            if site_path is not None:
                check = remote.Command(
                    f"{name}-{host}{CHECK_STEP_SUFFIX}",
                    connection=connection,
                    create=site.check_script(release),
                    triggers=triggers,
                    add_previous_output_in_env=False,
                    # after the host's own steps: one of them restarts sshd
                    opts=pulumi.ResourceOptions(parent=parent, depends_on=[web.last]),
                )
                copy = remote.CopyToRemote(
                    f"{name}-{host}-site-copy",
                    connection=connection,
                    source=check.stdout.apply(_release_source(site_path)),
                    remote_path=site.incoming_path(release),
                    triggers=triggers,
                    opts=pulumi.ResourceOptions(parent=parent, depends_on=[check]),
                )
                out[host] += [check, copy]
                after.append(copy)
            ip = settings.web_ips[settings.web_names.index(host)]
            switch = remote.Command(
                f"{name}-{host}-site",
                connection=connection,
                create=site.activate_script(
                    release, settings.site_releases, f"http://{ip}{site.RELEASE_URL}"
                ),
                triggers=triggers,
                add_previous_output_in_env=False,
                opts=pulumi.ResourceOptions(parent=parent, depends_on=after),
            )
            out[host].append(switch)
            this_wave.append(switch)
        previous_wave = this_wave
    return out


def _release_source(site_path: Path) -> Callable[[str | None], pulumi.Archive]:
    """The copy's source: the site, or a one-file stub when `site-check` found the
    release on the host already (a release is never shipped twice). The engine hashes
    the archive and stores its path and hash, never its content."""

    def source(check_output: str | None) -> pulumi.Archive:
        if check_output is not None and site.PRESENT in check_output:
            return pulumi.FileArchive(str(site.STUB_DIR))
        return pulumi.FileArchive(str(site_path))

    return source
