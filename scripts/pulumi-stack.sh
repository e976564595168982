#!/usr/bin/env bash
# Run a Pulumi command on a stack (default dev): local file state unless told otherwise.
# Usage: scripts/pulumi-stack.sh up|preview|destroy [extra pulumi args]
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:?usage: $0 up|preview|destroy}; shift
stack=${STACK:-dev}

if ! command -v pulumi >/dev/null 2>&1; then
  echo "pulumi CLI not found: install it (https://www.pulumi.com/docs/install/) and retry" >&2
  exit 127
fi
# State backend: PULUMI_BACKEND_URL wins, then an existing `pulumi login`; else local files.
if [ -z "${PULUMI_BACKEND_URL:-}" ] && ! pulumi whoami >/dev/null 2>&1; then
  export PULUMI_BACKEND_URL="file://$PWD/.pulumi-state"
  mkdir -p .pulumi-state
  echo "state: local file backend in .pulumi-state/ (set PULUMI_BACKEND_URL to change)"
fi
pulumi stack select --create "$stack" >/dev/null
# Required config missing: print the exact `pulumi config set` commands, not the CLI's error.
if [ "$action" = up ] || [ "$action" = preview ]; then
  .venv/bin/python -m ops.preflight --stack "$stack" || exit 2
fi
exec pulumi "$action" --stack "$stack" "$@"
