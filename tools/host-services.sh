#!/usr/bin/env bash
# Check that no etcd, BIRD or coild is left running on the host by a coil
# command: `snapshot FILE` records the PIDs running now, `check FILE` fails,
# naming them, when any such process started since then is still running,
# and, on a host whose init is systemd, when etcd.service or bird.service
# (the Debian packages' host services) is active.
set -euo pipefail
SYSTEMD_DIR=${COIL_SYSTEMD_DIR:-/run/systemd/system}   # present when systemd is the init
UNITS="etcd.service bird.service bird6.service"
pids() { pgrep -x 'etcd|bird|bird6|coild' 2>/dev/null || true; pgrep -f 'python[0-9.]* -m coil coild' 2>/dev/null || true; }
case "${1:-}" in
  snapshot) mkdir -p "$(dirname "$2")"; pids | sort -u > "$2" ;;
  check)
    left=$(comm -13 "$2" <(pids | sort -u) || true)
    rm -f "$2"
    # the packages' own host services (started before the snapshot, e.g. by
    # an install that did not go through tools/apt-install.sh)
    active=""
    if [ -d "$SYSTEMD_DIR" ] && command -v systemctl >/dev/null; then
      for unit in $UNITS; do
        systemctl is-active --quiet "$unit" 2>/dev/null && active="$active $unit"
      done
    fi
    if [ -n "$left" ] || [ -n "$active" ]; then
      [ -n "$left" ] && echo "left running on the host after the demo:" >&2
      for p in $left; do echo "  $p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)" >&2; done
      for unit in $active; do
        echo "host service $unit is running outside coil's namespaces: systemctl disable --now $unit" >&2
      done
      exit 1
    fi
    echo "host check: no etcd, BIRD or coild left running" ;;
  *) echo "usage: $0 snapshot|check FILE" >&2; exit 2 ;;
esac
