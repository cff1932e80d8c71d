#!/usr/bin/env bash
# kube-apiserver, kube-controller-manager and kubectl from the k8s.io/kubernetes module
# pinned in go.mod (this folder is a tools module: go.mod + go.sum, no Kubernetes source),
# into $1/bin. Builds only when $1 lacks the stamp for this exact go.mod/go.sum/script.
#
# Built as Kubernetes' own release builds do (hack/lib/golang.sh): static (CGO_ENABLED=0),
# -trimpath, no symbols (-s -w), tags notest,grpcnotrace, and the version stamped into
# k8s.io/component-base/version and k8s.io/client-go/pkg/version, so `--version` prints
# the release and version-gated clients (kubectl, server-side apply) see a real version.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-/var/cache/udpflannel-peers}"

version="$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$here/go.mod")"
[[ "$version" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || { echo "peers/kube: no k8s.io/kubernetes vX.Y.Z in go.mod" >&2; exit 1; }
major="${BASH_REMATCH[1]}" minor="${BASH_REMATCH[2]}"
commands=(kube-apiserver kube-controller-manager kubectl)
inputs="$(cat "$here/go.mod" "$here/go.sum" "$0" | sha256sum | cut -c1-16)"
stamp="$cache/stamps/kube-$version-$inputs"

have_all() { for c in "${commands[@]}"; do [[ -x "$cache/bin/$c" ]] || return 1; done; }
if [[ -e "$stamp" ]] && have_all; then
    exit 0
fi

mkdir -p "$cache/bin" "$cache/stamps"
exec 9>"$cache/stamps/kube.lock"
flock 9  # another clone may be building the same thing right now
if [[ -e "$stamp" ]] && have_all; then
    exit 0
fi

command -v go >/dev/null || { echo "peers/kube: no go on PATH (needs Go >= 1.26)" >&2; exit 1; }
echo "peers/kube: building kube-apiserver, kube-controller-manager, kubectl $version (several minutes, once)" >&2
start=$SECONDS
# The module's release date stands in for a build date: the same inputs give the same binaries.
build_date="$(cd "$here" && GOFLAGS=-mod=readonly go mod download -json "k8s.io/kubernetes@$version" \
    | sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' | head -1)"
build_date="${build_date:-1970-01-01T00:00:00Z}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

tmp="$(mktemp -d "$cache/bin/.kube-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
pkgs=()
for c in "${commands[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
(
    cd "$here"
    # GOTOOLCHAIN=local: fail here rather than fetch another Go behind our back.
    CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-buildvcs=false -mod=readonly" \
        go build -trimpath -tags notest,grpcnotrace -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}"
)
for c in "${commands[@]}"; do
    if [[ "$c" == kubectl ]]; then check=(version --client); else check=(--version); fi
    out="$("$tmp/$c" "${check[@]}" 2>&1)" || { echo "peers/kube: $c ${check[*]} failed: $out" >&2; exit 1; }
    [[ "$out" == *"$version"* ]] || { echo "peers/kube: $c reports '$out', not $version" >&2; exit 1; }
    mv -f "$tmp/$c" "$cache/bin/$c"
done
rm -f "$cache/stamps"/kube-v*
touch "$stamp"
echo "peers/kube: $version built in $((SECONDS - start)) s" >&2
