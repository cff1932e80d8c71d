#!/usr/bin/env bash
# etcd from the go.etcd.io/etcd/server/v3 module pinned in go.mod (a tools module: go.mod
# + go.sum, no etcd source), into $1/bin/etcd. Builds only when $1 lacks the stamp for
# this exact go.mod/go.sum/script. Static, -trimpath, no symbols, as etcd's ./build does.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-/var/cache/udpflannel-peers}"

version="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "$here/go.mod")"
[[ "$version" =~ ^v3\.[0-9]+\.[0-9]+$ ]] || { echo "peers/etcd: no go.etcd.io/etcd/server/v3 v3.Y.Z in go.mod" >&2; exit 1; }
inputs="$(cat "$here/go.mod" "$here/go.sum" "$0" | sha256sum | cut -c1-16)"
stamp="$cache/stamps/etcd-$version-$inputs"

if [[ -e "$stamp" && -x "$cache/bin/etcd" ]]; then
    exit 0
fi
mkdir -p "$cache/bin" "$cache/stamps"
exec 9>"$cache/stamps/etcd.lock"
flock 9  # another clone may be building the same thing right now
if [[ -e "$stamp" && -x "$cache/bin/etcd" ]]; then
    exit 0
fi

command -v go >/dev/null || { echo "peers/etcd: no go on PATH (needs Go >= 1.26)" >&2; exit 1; }
echo "peers/etcd: building etcd $version (a few minutes, once)" >&2
start=$SECONDS
tmp="$(mktemp -d "$cache/bin/.etcd-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
(
    cd "$here"
    # GOTOOLCHAIN=local: fail here rather than fetch another Go behind our back.
    CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-buildvcs=false -mod=readonly" \
        go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${version}" \
        -o "$tmp/etcd" go.etcd.io/etcd/server/v3
)
out="$("$tmp/etcd" --version 2>&1)" || { echo "peers/etcd: etcd --version failed: $out" >&2; exit 1; }
[[ "$out" == *"etcd Version: ${version#v}"* ]] || { echo "peers/etcd: etcd reports '$out', not $version" >&2; exit 1; }
mv -f "$tmp/etcd" "$cache/bin/etcd"
rm -f "$cache/stamps"/etcd-v*
touch "$stamp"
echo "peers/etcd: $version built in $((SECONDS - start)) s" >&2
