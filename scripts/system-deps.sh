#!/usr/bin/env bash
# Debian packages the test tiers need: the real daemons and checkers (render+check, lab),
# and debootstrap + systemd-nspawn for the local-cloud tier. Installs what is missing when
# run as root; otherwise lists it, and the tiers that need it skip loudly with the reason.
set -euo pipefail

packages=(haproxy keepalived apache2 curl iproute2 iptables procps python3 python3-venv
  debootstrap systemd-container openssh-client openssh-server xz-utils wrk
  prometheus-node-exporter openssl dehydrated pebble nghttp2-client)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: not root; missing Debian packages: ${missing[*]}" >&2
  echo "system-deps: the tiers that need them will be skipped (sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# policy-rc.d 101: packages must not start their daemons on this machine; the tests start
# their own copies inside network namespaces.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get install -y -q --no-install-recommends "${missing[@]}"
