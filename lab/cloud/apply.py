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

import shlex
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

from lab.cloud.common import CloudError
from lab.cloud.host import CloudHost
from lab.program import RemoteStep

Status = Literal["ran", "failed", "unchanged", "not run"]
STEP_TIMEOUT = 900.0
APPLY_TIMEOUT = 1800.0


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
                r = hosts[step.host].ssh(
                    step.create, stdin=step.stdin, timeout=step_timeout, check=False
                )
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
