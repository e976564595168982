"""Day-2 shell: root's SSH keys, handing a host over (drain), taking it back, readiness.

Every script here runs on a server as a pulumi-command remote step (or, for an in-place
resize, from a resource hook) and is built from settings only: no secret is ever in its
text. Each one is idempotent and bounded in time.

* `keys_script`: root's authorized_keys from stdin (sshPublicKey + extraSshPublicKeys),
  replaced atomically, never with an empty list.
* `drain_script`: the host leaves service without failing a request. A web server fails
  its health check on purpose (the check file is moved aside), waits until both LBs had
  time to mark it DOWN and no request arrived for a while, then stops Apache (Debian's
  unit stops it gracefully: requests in flight finish). An LB stops keepalived (a
  priority-0 advert: the peer becomes MASTER and claims the floating IP), waits until
  the address left this host, then lets HAProxy finish its connections (soft stop). A
  marker file makes a second drain a no-op and keeps the daemons down across a reboot
  (the units are disabled), so a power cycle cannot bring a drained host back early.
* `undrain_script`: the reverse, on a drained or a fresh host.
* `lb_ready_script` / `web_ready_script`: bounded waits until the host serves again: an
  LB's daemons are active and its VRRP instance entered BACKUP or MASTER; a web server
  is UP in the HAProxy of the LB the step runs on.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pulumi

from components.config import Settings
from components.render import DAEMONS

STATE_DIR = "/var/lib/hcloud-ha-web"
DRAINED_MARKER = f"{STATE_DIR}/drained"
HAPROXY_SOCKET = "/run/haproxy/admin.sock"
#: Upper bound of every wait in these scripts, in seconds.
WAIT_LIMIT = 120
#: Seconds a leaving LB keeps HAProxy up after keepalived stopped: the peer's API claim
#: of the floating IP takes about a second (README: failover figures).
LB_HANDOVER_SECONDS = 3

_SOCKET_CLIENT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(2)\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode()+b'\\n')\n"
    "for _ in range(10000):\n"
    "    b=s.recv(65536)\n"
    "    if not b: break\n"
    "    sys.stdout.buffer.write(b)\n"
)


def authorized_keys(settings: Settings, current: str) -> str:
    """root's authorized_keys: the stack's current key first (configured or generated),
    then the extra ones, no repeats."""
    keys: list[str] = []
    for key in (current, *settings.extra_ssh_public_keys):
        if key.strip() and key.strip() not in keys:
            keys.append(key.strip())
    return "".join(f"{k}\n" for k in keys)


def keys_script() -> str:
    """Install stdin as root's authorized_keys (atomically; refuses an empty list)."""
    return """set -eu
umask 077
mkdir -p /root/.ssh
tmp=$(mktemp /root/.ssh/.authorized_keys.XXXXXX)
trap 'rm -f "$tmp"' EXIT
cat > "$tmp"
if ! grep -q '^[a-z]' "$tmp"; then
  echo "hcloud-ha-web: no SSH public key given; authorized_keys left as it is" >&2
  exit 1
fi
chmod 600 "$tmp"
mv -f "$tmp" /root/.ssh/authorized_keys
echo "hcloud-ha-web: root has $(grep -c '^[a-z]' /root/.ssh/authorized_keys) authorized key(s)"
"""


def _check_file(settings: Settings) -> str:
    """The file HAProxy's health check requests, where the render table puts it."""
    spec = next(f for d in DAEMONS for f in d.files if f.template == "www/check.txt.j2")
    return shlex.quote(spec.dest.replace("{health_check_path}", settings.health_check_path))


def _quiet_seconds(settings: Settings) -> int:
    """How long a web server waits for both LBs to mark it DOWN: `fall` failed checks,
    one more interval for a check in flight, and a second of margin."""
    interval_s = settings.haproxy_check_interval_ms / 1000
    return int((settings.haproxy_check_fall + 1) * interval_s + 1.999)


def drain_script(role: str, settings: Settings) -> str:
    """Hand the host over before it is stopped, replaced, resized or removed."""
    head = f"""set -eu
mkdir -p {STATE_DIR}
if [ -e {DRAINED_MARKER} ]; then echo "hcloud-ha-web: $(hostname) already drained"; exit 0; fi
"""
    if role == "web":
        check = _check_file(settings)
        quiet = _quiet_seconds(settings)
        return (
            head
            + f"""# Fail the health check on purpose: both LBs mark this server DOWN.
if [ -e {check} ]; then mv -f {check} {check}.drained; fi
sleep {quiet}
# Then wait (bounded) until no request arrived for {quiet}s: in-flight requests finish.
log=/var/log/apache2/access.log
for _ in $(seq 1 {WAIT_LIMIT * 2}); do
  last=$(stat -c %Y "$log" 2>/dev/null || echo 0)
  [ $(( $(date +%s) - last )) -ge {quiet} ] && break
  sleep 0.5
done
touch {DRAINED_MARKER}
# Debian's apache2.service stops with `apachectl graceful-stop`; disabled so a power
# cycle does not bring it back before the host is taken back.
systemctl disable -q --now apache2
echo "hcloud-ha-web: $(hostname) drained (DOWN in both LBs, Apache stopped)"
"""
        )
    return (
        head
        + f"""touch {DRAINED_MARKER}
# keepalived stops with a priority-0 advert: the peer becomes MASTER at once and claims
# the floating IP through the API; give the claim time before HAProxy goes.
systemctl disable -q --now keepalived
sleep {LB_HANDOVER_SECONDS}
# HAProxy's soft stop (SIGUSR1) lets its connections finish; the stop is bounded.
if systemctl is-active -q haproxy; then
  systemctl kill -s USR1 --kill-whom=main haproxy || true
  for _ in $(seq 1 {WAIT_LIMIT * 2}); do systemctl is-active -q haproxy || break; sleep 0.5; done
fi
systemctl disable -q --now haproxy
echo "hcloud-ha-web: $(hostname) handed over (keepalived and HAProxy stopped)"
"""
    )


def undrain_script(role: str, settings: Settings) -> str:
    """Take a drained (or fresh) host back into service; a no-op on a serving host."""
    if role == "web":
        check = _check_file(settings)
        body = f"""if [ -e {check}.drained ] && [ ! -e {check} ]; then
  mv -f {check}.drained {check}
fi
systemctl enable -q --now apache2"""
    else:
        body = "systemctl enable -q --now haproxy keepalived"
    return f"""set -eu
{body}
rm -f {DRAINED_MARKER}
echo "hcloud-ha-web: $(hostname) in service"
"""


def lb_ready_script() -> str:
    """Wait (bounded) until HAProxy and keepalived are active and VRRP is BACKUP/MASTER."""
    return f"""set -eu
state=""
for _ in $(seq 1 {WAIT_LIMIT * 2}); do
  if systemctl is-active -q haproxy && systemctl is-active -q keepalived; then
    inv=$(systemctl show -p InvocationID --value keepalived)
    state=$(journalctl -q --no-pager -o cat _SYSTEMD_INVOCATION_ID="$inv" \\
      | grep -Eo 'Entering (MASTER|BACKUP|FAULT) STATE' | tail -n 1 || true)
    case "$state" in
      *MASTER*|*BACKUP*) echo "hcloud-ha-web: $(hostname) ready: $state"; exit 0;;
    esac
  fi
  sleep 0.5
done
echo "hcloud-ha-web: $(hostname) not ready within {WAIT_LIMIT}s (VRRP: ${{state:-none}})" >&2
exit 1
"""


def web_ready_script(web: str) -> str:
    """On an LB: wait (bounded) until `web` is UP (operational state 2) in its HAProxy."""
    client = shlex.quote(_SOCKET_CLIENT)
    return f"""set -eu
op=""
for _ in $(seq 1 {WAIT_LIMIT * 2}); do
  op=$(python3 -c {client} {HAPROXY_SOCKET} 'show servers state web' 2>/dev/null \\
    | awk '$4 == "{web}" {{print $6}}' || true)
  if [ "$op" = 2 ]; then echo "hcloud-ha-web: {web} UP in HAProxy on $(hostname)"; exit 0; fi
  sleep 0.5
done
echo "hcloud-ha-web: {web} not UP in HAProxy on $(hostname)" \
  "within {WAIT_LIMIT}s (state ${{op:-none}})" >&2
exit 1
"""


# --- in-place changes of a server (resize): a resource hook drains it first ----------

RemoteRunner = Callable[[str, str], None]
"""(server address, script): run the script on the server as root; raise on failure."""

#: Every drain hook the program created, by hook name (the lab replays them from here).
HOOKS: dict[str, pulumi.ResourceHook] = {}
#: Set by the lab to run hook scripts on its hosts; None: over SSH (`SshRunner`).
REMOTE_RUNNER: RemoteRunner | None = None


class SshRunner:
    """Runs a script as root over SSH with the stack's private key (from `pulumi up`'s
    machine, as the remote steps do); the key only ever lives in a 0600 temp file."""

    def __init__(self, private_key: pulumi.Output[str], timeout: float = 600) -> None:
        self._key: list[str] = []
        self.timeout = timeout
        private_key.apply(self._key.append)

    def __call__(self, address: str, script: str) -> None:
        if not self._key:
            raise RuntimeError("the SSH private key is not known yet")
        with tempfile.TemporaryDirectory() as tmp:
            key = Path(tmp, "id")
            key.touch(mode=0o600)
            key.write_text(self._key[0].rstrip("\n") + "\n")
            argv = [
                "ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={tmp}/known_hosts",
                "-o", "ConnectTimeout=10", "--", f"root@{address}", "sh -s",
            ]  # fmt: skip
            r = subprocess.run(
                argv, input=script, text=True, capture_output=True, timeout=self.timeout
            )
        if r.returncode != 0:
            raise RuntimeError(
                f"drain on {address} failed (exit {r.returncode}): {r.stderr[-2000:]}"
            )


def drain_hook(
    resource_name: str, role: str, settings: Settings, ssh: RemoteRunner
) -> pulumi.ResourceHook:
    """A `before_update` hook for a server: the engine runs it before an in-place update
    (a resize powers the server off), so the server hands over first. The engine runs
    before-hooks before the step and fails the step when the hook raises; a before_update
    hook gets the old outputs (the address). Pulumi docs, resource option `hooks`:
    https://www.pulumi.com/docs/iac/concepts/options/hooks/"""
    script = drain_script(role, settings)

    def drain(args: pulumi.ResourceHookArgs) -> None:
        old = dict(args.old_outputs or {})
        address = str(old.get("ipv4Address") or "")
        if not address:
            raise RuntimeError(f"{args.name}: no address in the old state; cannot drain")
        (REMOTE_RUNNER or ssh)(address, script)

    hook = pulumi.ResourceHook(f"{resource_name}-drain", drain)
    HOOKS[hook.name] = hook
    return hook
