"""Run the program's remote steps on booted hosts, as `pulumi up` would.

`apply()` takes the steps the program registered (`lab.program.remote_steps`) and runs
each step's `create` command over SSH on the host its connection names, with its stdin,
in dependency order and in parallel where the graph allows. Like the engine:

* a step runs only when it is new or its inputs (command, stdin, triggers, connection)
  changed since the last apply (`previous`); `force=True` runs every step, as
  `pulumi up --replace` or new servers would;
* once a step fails, no further step starts; steps already running finish, the rest
  are reported as not run.

Every step and the whole apply are bounded in time.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import pulumi

from components.identity import ClusterIdentityProvider
from lab.cloud.common import CloudError
from lab.cloud.host import CloudHost
from lab.program import (
    COMMAND_TYPE,
    COPY_TYPE,
    DYNAMIC_TYPE,
    SERVER_TYPE,
    PlannedResource,
    RemoteStep,
)

Status = Literal["ran", "failed", "unchanged", "not run"]
STEP_TIMEOUT = 900.0
APPLY_TIMEOUT = 1800.0


#: pulumi-command retries a connection that fails before the command starts
#: (`dialErrorLimit`, the program sets 30; `perDialTimeout` 10 s): an sshd restarted by
#: another step must not fail a step that happens to connect in that moment.
DIAL_ATTEMPTS = 30
DIAL_PAUSE = 1.0
_DIAL_FAILURE = re.compile(
    r"ssh: connect to host \S+ port \d+: (Connection refused|Connection timed out|No route to host)"
)


def run_step(
    host: CloudHost, script: str, stdin: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a command's `create` (or `delete`) on `host` as the provider does, dial
    retries included."""
    for _ in range(DIAL_ATTEMPTS - 1):
        r = host.ssh(script, stdin=stdin, timeout=timeout, check=False)
        if r.returncode != 255 or not _DIAL_FAILURE.search(r.stderr):
            return r
        time.sleep(DIAL_PAUSE)
    return host.ssh(script, stdin=stdin, timeout=timeout, check=False)


@dataclass(frozen=True)
class StepRun:
    name: str
    status: Status
    started: float = 0.0
    """time.monotonic() when the step started (0: it did not run)."""
    finished: float = 0.0
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def seconds(self) -> float:
        return self.finished - self.started


@dataclass(frozen=True)
class ApplyResult:
    runs: Mapping[str, StepRun]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.status in ("ran", "unchanged") for r in self.runs.values())

    def named(self, status: Status) -> list[str]:
        return [n for n, r in self.runs.items() if r.status == status]

    def failure(self) -> str:
        """The failed steps with their output, for error messages."""
        return "\n".join(
            f"{r.name} (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
            for r in self.runs.values()
            if r.status == "failed"
        )


def changed(steps: Mapping[str, RemoteStep], previous: Mapping[str, RemoteStep]) -> set[str]:
    """Steps the engine would run: new ones and those whose inputs differ."""
    return {n for n, s in steps.items() if n not in previous or previous[n].inputs != s.inputs}


def apply(
    steps: Mapping[str, RemoteStep],
    hosts: Mapping[str, CloudHost],
    previous: Mapping[str, RemoteStep] | None = None,
    *,
    force: bool = False,
    step_timeout: float = STEP_TIMEOUT,
    timeout: float = APPLY_TIMEOUT,
) -> ApplyResult:
    """Run the steps that changed since ``previous`` (all when ``force`` or no previous).

    ``hosts`` maps each server address a step connects to onto the host behind it.
    """
    for s in steps.values():
        if s.host not in hosts:
            raise CloudError(f"step {s.name} connects to {s.host}, which no lab host has")
        if s.user != "root":
            raise CloudError(f"step {s.name} logs in as {s.user!r}; the lab hosts admit root")
        unknown = [a for a in s.after if a not in steps]
        if unknown:
            raise CloudError(f"step {s.name} waits for unknown steps {unknown}")
    todo = set(steps) if force or previous is None else changed(steps, previous)
    runs: dict[str, StepRun] = {n: StepRun(n, "unchanged") for n in steps if n not in todo}
    lock = threading.Lock()
    started = time.monotonic()

    def execute(step: RemoteStep) -> StepRun:
        t0 = time.monotonic()
        try:
            if step.is_copy:
                r = replay_copy(step, hosts[step.host], step_timeout)
            else:
                r = run_step(hosts[step.host], step.create, step.stdin, step_timeout)
        except CloudError as exc:
            return StepRun(step.name, "failed", t0, time.monotonic(), None, "", str(exc))
        status: Status = "ran" if r.returncode == 0 else "failed"
        return StepRun(step.name, status, t0, time.monotonic(), r.returncode, r.stdout, r.stderr)

    pending = set(todo)
    running: dict[Future[StepRun], str] = {}
    failed = False
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for _ in range(len(todo) + 1):
            if not failed:
                with lock:
                    done = {n for n, r in runs.items() if r.status in ("ran", "unchanged")}
                for name in sorted(pending):
                    if all(a in done for a in steps[name].after):
                        pending.discard(name)
                        running[pool.submit(execute, steps[name])] = name
            if not running:
                break
            left = timeout - (time.monotonic() - started)
            finished, _ = wait(running, timeout=max(left, 0), return_when=FIRST_COMPLETED)
            if not finished:
                raise CloudError(
                    f"apply took longer than {timeout:.0f}s: {sorted(running.values())}"
                )
            for future in finished:
                result = future.result()
                del running[future]
                with lock:
                    runs[result.name] = result
                failed = failed or result.status == "failed"
    for name in pending:
        runs[name] = StepRun(name, "not run")
    ordered = {n: runs[n] for n in steps}
    return ApplyResult(ordered, time.monotonic() - started)


# --- a whole `pulumi up` on a deployed cluster, in the engine's order -------------------
#
# What the engine does, and where it says so:
# * A resource's step starts only after the steps of the resources it depends on
#   (depends_on and inputs from their outputs) finished (Pulumi docs, resource option
#   dependsOn: "ensures that resource creation, update, and deletion operations are
#   executed in the correct order").
# * Diff: a command is replaced when its `triggers` change (pulumi-command docs), updated
#   (its `create` runs again) when another input changes; a server is replaced when an
#   input the provider cannot update changes (image, location, datacenter, ssh_keys,
#   user_data: ForceNew in the Hetzner provider's schema), updated in place otherwise
#   (server_type: a resize, the server is powered off). `ignore_changes` inputs are not
#   diffed.
# * Replacement with delete-before-replace: first the dependents that would be replaced
#   by the change (their inputs come from a replaced resource and their provider's diff
#   with those inputs unknown says replace) are deleted, in reverse dependency order,
#   then the resource itself; then it is created, and its dependents are created when
#   their turn comes (pulumi/pulumi pkg/resource/deploy/step_generator.go,
#   calculateDependentReplacements; tests/integration/delete_before_create/step2).
#   Without it: the new one is created first, the old one deleted at the end.
# * A `remote.Command`'s `delete` runs on its host when the command is deleted.
# * `before_update` resource hooks run before the update step; an error fails the step
#   (pulumi.ResourceHookBinding docs).
# * Resources no longer in the program are deleted after every other step, in reverse
#   dependency order.
# * A dynamic provider's `check(olds, news)` runs when the resource is registered; a
#   failure stops the update there.

SERVER_REPLACE_KEYS = frozenset({"image", "location", "datacenter", "sshKeys", "userData"})

Op = Literal["create", "update", "replace", "same"]


class Cloud(Protocol):
    """What the lab does for the provider's part of each step."""

    def run(self, address: str, script: str, stdin: str) -> tuple[int, str, str]:
        """Run `script` as root on the server at `address` (a command's create/delete)."""

    def copy(self, name: str) -> tuple[int, str, str]:
        """Run the `remote.CopyToRemote` `name` of the new program (its archive lands)."""

    def server_create(self, name: str, inputs: Mapping[str, Any]) -> None: ...

    def server_delete(self, name: str) -> None: ...

    def server_update(self, name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Event:
    """One thing the replay did, in order (for tests and the bench)."""

    at: float
    what: str
    """create, update, replace, delete (of a resource), hook (a before_update hook)."""
    name: str
    seconds: float = 0.0


def _changed(old: PlannedResource, new: PlannedResource) -> set[str]:
    keys = set(old.inputs) | set(new.inputs)
    ignored = set(new.ignore_changes)
    return {
        k
        for k in keys
        if k not in ignored and not k.startswith("__") and old.inputs.get(k) != new.inputs.get(k)
    }


def diff(old: PlannedResource | None, new: PlannedResource) -> Op:
    if old is None:
        return "create"
    changed = _changed(old, new)
    if not changed:
        return "same"
    if new.type == COMMAND_TYPE:
        return "replace" if "triggers" in changed else "update"
    if new.type == SERVER_TYPE:
        return "replace" if changed & SERVER_REPLACE_KEYS else "update"
    return "update"


def _requires_replacement(r: PlannedResource, replaced: set[str]) -> bool:
    """Would `r` be replaced if the resources in `replaced` were? (its inputs from them
    become unknown; diffed by its provider, ignore_changes honoured)"""
    unknown = {k for k, srcs in r.sources.items() if set(srcs) & replaced}
    unknown -= set(r.ignore_changes)
    if r.type == COMMAND_TYPE:
        return "triggers" in unknown
    if r.type == SERVER_TYPE:
        return bool(unknown & SERVER_REPLACE_KEYS)
    # a floating IP assignment with server_id ignored, a subnet, ...: updated, not replaced
    return False


def dependent_replacements(root: str, old: Mapping[str, PlannedResource]) -> list[str]:
    """What the engine deletes before `root` (delete-before-replace), in dependency order."""
    replaced = {root}
    out: list[str] = []
    for name, r in old.items():  # registration order is a dependency order
        if name in replaced or not (set(r.after) & replaced or _sources(r) & replaced):
            continue
        if _requires_replacement(r, replaced):
            replaced.add(name)
            out.append(name)
    return out


def _sources(r: PlannedResource) -> set[str]:
    return {s for srcs in r.sources.values() for s in srcs}


def rollout(
    old: Mapping[str, PlannedResource],
    new: Mapping[str, PlannedResource],
    cloud: Cloud,
    *,
    hooks: Mapping[str, Callable[[Any], Any]] | None = None,
    step_timeout: float = STEP_TIMEOUT,
    timeout: float = APPLY_TIMEOUT,
) -> tuple[ApplyResult, list[Event]]:
    """Replay `pulumi up` from the state `old` to the program `new` (see above)."""
    hooks = hooks or {}
    started = time.monotonic()
    events: list[Event] = []
    lock = threading.Lock()

    def note(what: str, name: str, t0: float) -> None:
        with lock:
            events.append(Event(t0 - started, what, name, time.monotonic() - t0))

    for name, r in new.items():
        if r.type == DYNAMIC_TYPE and name in old:
            inputs = {k: v for k, v in r.inputs.items() if not k.startswith("__")}
            olds = {k: v for k, v in old[name].inputs.items() if not k.startswith("__")}
            failures = ClusterIdentityProvider().check(olds, inputs).failures or []
            if failures:
                raise CloudError("; ".join(f"{f.property}: {f.reason}" for f in failures))

    deleted: set[str] = set()  # deleted early by a delete-before-replace cascade

    def address(r: PlannedResource) -> str:
        return str(r.inputs["connection"]["host"])

    def delete(r: PlannedResource) -> StepRun:
        t0 = time.monotonic()
        if r.type == COMMAND_TYPE and r.inputs.get("delete"):
            rc, out, err = cloud.run(address(r), str(r.inputs["delete"]), "")
            note("delete", r.name, t0)
            if rc != 0:
                return StepRun(r.name, "failed", t0, time.monotonic(), rc, out, err)
        elif r.type == SERVER_TYPE:
            cloud.server_delete(r.name)
            note("delete", r.name, t0)
        with lock:
            deleted.add(r.name)
        return StepRun(r.name, "ran", t0, time.monotonic(), 0)

    def create(r: PlannedResource, what: str) -> StepRun:
        t0 = time.monotonic()
        if r.type == COMMAND_TYPE:
            stdin = str(r.inputs.get("stdin") or "")
            rc, out, err = cloud.run(address(r), str(r.inputs["create"]), stdin)
            note(what, r.name, t0)
            status: Status = "ran" if rc == 0 else "failed"
            return StepRun(r.name, status, t0, time.monotonic(), rc, out, err)
        if r.type == COPY_TYPE:
            rc, out, err = cloud.copy(r.name)
            note(what, r.name, t0)
            return StepRun(
                r.name, "ran" if rc == 0 else "failed", t0, time.monotonic(), rc, out, err
            )
        if r.type == SERVER_TYPE:
            cloud.server_create(r.name, r.inputs)
        note(what, r.name, t0)
        return StepRun(r.name, "ran", t0, time.monotonic(), 0)

    def step(name: str) -> StepRun:
        r, prev = new[name], old.get(name)
        op = "create" if name in deleted else diff(prev, r)
        if op == "same":
            return StepRun(name, "unchanged")
        if op == "create":
            return create(r, "create")
        assert prev is not None
        if op == "update":
            if r.type == SERVER_TYPE:
                t0 = time.monotonic()
                for hook in r.hooks.get("before_update", ()):
                    h0 = time.monotonic()
                    hooks[hook](_hook_args(prev))
                    note("hook", hook, h0)
                u0 = time.monotonic()  # the update itself starts after its hooks
                cloud.server_update(name, prev.inputs, r.inputs)
                note("update", name, u0)
                return StepRun(name, "ran", t0, time.monotonic(), 0)
            return create(r, "update")
        # replace
        if r.delete_before_replace:
            for dependent in reversed(dependent_replacements(name, old)):
                if dependent not in deleted:
                    run = delete(old[dependent])
                    if run.status == "failed":
                        return run
            run = delete(prev)
            if run.status == "failed":
                return run
            return create(r, "replace")
        run = create(r, "replace")
        if run.status == "ran":
            pending_deletes.append(prev)
        return run

    pending_deletes: list[PlannedResource] = []
    todo = list(new)
    runs: dict[str, StepRun] = {}
    pending = set(todo)
    running: dict[Future[StepRun], str] = {}
    failed = False
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        for _ in range(len(todo) + 1):
            if not failed:
                with lock:
                    done = {n for n, r in runs.items() if r.status in ("ran", "unchanged")}
                for name in [n for n in todo if n in pending]:
                    if all(a in done or a not in new for a in new[name].after):
                        pending.discard(name)
                        running[pool.submit(step, name)] = name
            if not running:
                break
            left = timeout - (time.monotonic() - started)
            finished, _ = wait(running, timeout=max(left, 0), return_when=FIRST_COMPLETED)
            if not finished:
                raise CloudError(
                    f"update took longer than {timeout:.0f}s: {sorted(running.values())}"
                )
            for future in finished:
                result = future.result()
                del running[future]
                with lock:
                    runs[result.name] = result
                failed = failed or result.status == "failed"
    for name in pending:
        runs[name] = StepRun(name, "not run")
    if not failed:
        # gone from the program, and the old halves of create-before-delete replacements:
        # deleted last, dependents first
        gone = [old[n] for n in old if n not in new and n not in deleted]
        for r in reversed([*gone, *pending_deletes]):
            run = delete(r)
            runs.setdefault(r.name, run)
            if run.status == "failed":
                runs[r.name] = run
                break
    ordered = {n: runs[n] for n in [*new, *(n for n in runs if n not in new)]}
    return ApplyResult(ordered, time.monotonic() - started), sorted(events, key=lambda e: e.at)


def _hook_args(prev: PlannedResource) -> pulumi.ResourceHookArgs:
    return pulumi.ResourceHookArgs(
        urn=prev.name,
        id=str(prev.inputs.get("id", "")),
        name=prev.name,
        type=prev.type,
        old_inputs=prev.inputs,
        old_outputs=prev.outputs,
    )


def replay_copy(
    step: RemoteStep, host: CloudHost, timeout: float
) -> subprocess.CompletedProcess[str]:
    """A `remote.CopyToRemote` of a FileArchive directory, as the provider does it: the
    directory's content lands at the remote path (created with its parents); when the
    remote path is an existing directory, the source directory goes inside it.

    The provider copies over SFTP; here tar streams over the same kind of SSH session.
    """
    if not step.source or not step.remote_path.startswith("/"):
        raise CloudError(f"{step.name}: not a copy of a local directory to an absolute path")
    remote = shlex.quote(step.remote_path)
    name = shlex.quote(step.source.rstrip("/").rsplit("/", 1)[-1])
    unpack = (
        f'set -eu; dest={remote}; [ -d "$dest" ] && dest="$dest"/{name}; '
        'mkdir -p "$dest" && tar -xf - -C "$dest" --no-same-owner'
    )
    with subprocess.Popen(
        ["tar", "-cf", "-", "-C", step.source, "."], stdout=subprocess.PIPE
    ) as tar:
        try:
            r = subprocess.run(
                host.ssh_argv(unpack), stdin=tar.stdout, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            tar.kill()
            raise CloudError(f"{step.name}: copy timed out after {timeout:.0f}s") from exc
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
        tar_rc = tar.wait(timeout=30)
    stderr = r.stderr.decode(errors="replace")
    if tar_rc != 0:
        stderr += f"\nlocal tar of {step.source} failed (exit {tar_rc})"
    return subprocess.CompletedProcess(
        r.args, r.returncode or tar_rc, r.stdout.decode(errors="replace"), stderr
    )
