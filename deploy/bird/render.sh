#!/bin/sh
# Render a BIRD template of this directory for one node and check it.
#
#   NODE_ADDRESS=10.69.0.11 NODE_AS=64601 TOR_ADDRESS=10.69.0.1 TOR_AS=64600 \
#   POOL_PREFIXES='10.64.0.0/14{14,32}' deploy/bird/render.sh bird-tor.conf.tmpl > bird.conf
#
# Every ${NAME} of the template must be set (a missing one is an error
# naming it; nothing is printed). With bird on PATH the result is parsed
# with "bird -p" before it is printed. Needs envsubst (Debian: gettext-base).
set -eu
if [ $# -ne 1 ]; then
  echo "usage: render.sh TEMPLATE > bird.conf" >&2
  exit 2
fi
tmpl=$1
[ -f "$tmpl" ] || tmpl="$(dirname "$0")/$1"
if [ ! -f "$tmpl" ]; then
  echo "render.sh: error: no template $1" >&2
  exit 1
fi
vars=$(grep -o '\${[A-Z0-9_]*}' "$tmpl" | sort -u | tr -d '${}')
for v in $vars; do
  eval "set_=\${$v+x}"
  if [ -z "$set_" ]; then
    echo "render.sh: error: $v is not set (the template uses: $(echo $vars))" >&2
    exit 1
  fi
done
list=$(for v in $vars; do printf '${%s} ' "$v"; done)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
envsubst "$list" < "$tmpl" > "$out"
if command -v bird >/dev/null 2>&1; then
  if ! msg=$(bird -p -c "$out" 2>&1); then
    echo "render.sh: error: bird rejects the result: $msg" >&2
    exit 1
  fi
fi
cat "$out"
