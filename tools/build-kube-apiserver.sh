#!/usr/bin/env bash
# Build kube-apiserver from Debian's `kubernetes` source package (1.20.2) into
# a git-ignored cache directory. Idempotent: does nothing when the binary is
# already there. Never touches the system's apt configuration: it uses a
# private deb-src list and a private apt lists directory under the cache.
#
# Usage: tools/build-kube-apiserver.sh [CACHE_DIR]   (default: $KUBE_CACHE_DIR or /var/cache/coil-kube, outside the clone so that every clone and CI run reuses it)
# Prints the path of the binary on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${1:-${KUBE_CACHE_DIR:-/var/cache/coil-kube}}"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
BIN="$CACHE/bin/kube-apiserver"

if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

# Build dependencies.
need=""
for p in golang-go rsync dpkg-dev make; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
  echo "installing:$need" >&2
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need >&2
fi

# Private deb-src list (Debian bookworm main), signed by the system keyring.
APTDIR="$CACHE/apt"
mkdir -p "$APTDIR/lists/partial"
SRCLIST="$APTDIR/sources.list"
{
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
} > "$SRCLIST.tmp"
mv "$SRCLIST.tmp" "$SRCLIST"
APT_OPTS=(-o "Dir::Etc::SourceList=$SRCLIST" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache"
          -o "APT::Sandbox::User=root")
mkdir -p "$APTDIR/cache/archives/partial"

SRC="$(ls -d "$CACHE"/src/kubernetes-*/ 2>/dev/null | head -n1 || true)"
if [ -z "$SRC" ] || [ ! -f "$SRC/.unpacked" ]; then
  rm -rf "$CACHE/src"
  mkdir -p "$CACHE/src"
  apt-get "${APT_OPTS[@]}" update -q >&2
  (cd "$CACHE/src" && apt-get "${APT_OPTS[@]}" source -q kubernetes >&2)
  SRC="$(ls -d "$CACHE"/src/kubernetes-*/ | head -n1)"
  touch "$SRC/.unpacked"
fi
SRC="${SRC%/}"

# GOPATH mode: GOPATH/src/k8s.io/kubernetes -> the unpacked tree.
GOPATH_DIR="$CACHE/gopath"
mkdir -p "$GOPATH_DIR/src/k8s.io"
ln -sfn "$SRC" "$GOPATH_DIR/src/k8s.io/kubernetes"

export GOPATH="$GOPATH_DIR" GO111MODULE=off CGO_ENABLED=0 GOPROXY=off
unset GOFLAGS
(cd "$GOPATH_DIR/src/k8s.io/kubernetes" && make WHAT=cmd/kube-apiserver >&2)

OUT="$(ls "$SRC"/_output/local/bin/*/*/kube-apiserver 2>/dev/null | head -n1 || true)"
[ -n "$OUT" ] || OUT="$SRC/_output/bin/kube-apiserver"
mkdir -p "$CACHE/bin"
cp "$OUT" "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
# The unpacked tree and its build output take ~1.8 GB; the binary is all the
# tests need. KUBE_KEEP_SOURCE=1 keeps them (e.g. to rebuild quickly).
if [ "${KUBE_KEEP_SOURCE:-0}" != "1" ]; then
  rm -rf "$CACHE/src" "$CACHE/gopath" "$APTDIR/cache"
fi
echo "$BIN"
