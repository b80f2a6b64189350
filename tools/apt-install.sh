#!/usr/bin/env bash
# Install Debian packages WITHOUT starting their services on the host.
#
# etcd-server and bird2 ship services (etcd.service, bird.service) that the
# package scripts start and enable. Coil runs its own etcd and BIRD inside
# network namespaces only, so a host service would break the promise that
# nothing outside coil's namespaces changes. While installing, a temporary
# /usr/sbin/policy-rc.d (exit 101: "action forbidden") stops invoke-rc.d and
# deb-systemd-invoke from starting anything; afterwards, on a host running
# systemd, the services of the packages this run installed are disabled so
# that they do not start at the next boot either.
#
# Usage: tools/apt-install.sh PACKAGE...   (installs only what is missing; idempotent)
set -euo pipefail

missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"

POLICY=/usr/sbin/policy-rc.d
placed=""
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# placed by coil tools/apt-install.sh for the duration of one install\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  placed=1
fi
cleanup() { [ -n "$placed" ] && rm -f "$POLICY"; }
trap cleanup EXIT

apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"

# Services the packages we just installed would start at boot.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  for p in "${missing[@]}"; do
    for unit in $(dpkg -L "$p" 2>/dev/null | grep -E '^/(usr/)?lib/systemd/system/[^/]+\.service$' | xargs -r -n1 basename); do
      systemctl disable --now "$unit" >/dev/null 2>&1 && echo "disabled host service $unit (coil runs its own, in namespaces)"
    done
  done
fi
