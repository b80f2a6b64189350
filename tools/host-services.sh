#!/usr/bin/env bash
# Check that no etcd, BIRD or coild is left running on the host by a coil
# command: `snapshot FILE` records the PIDs running now, `check FILE` fails,
# naming them, when any such process started since then is still running.
set -euo pipefail
pids() { pgrep -x 'etcd|bird|bird6|coild' 2>/dev/null || true; pgrep -f 'python[0-9.]* -m coil coild' 2>/dev/null || true; }
case "${1:-}" in
  snapshot) mkdir -p "$(dirname "$2")"; pids | sort -u > "$2" ;;
  check)
    left=$(comm -13 "$2" <(pids | sort -u) || true)
    rm -f "$2"
    if [ -n "$left" ]; then
      echo "left running on the host after the demo:" >&2
      for p in $left; do echo "  $p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)" >&2; done
      exit 1
    fi
    echo "host check: no etcd, BIRD or coild left running" ;;
  *) echo "usage: $0 snapshot|check FILE" >&2; exit 2 ;;
esac
