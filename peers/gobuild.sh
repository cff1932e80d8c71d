# Sourced by peers/<name>/build.sh (from its own folder): build one Go main package,
# pinned by the small module in that folder (go.mod + go.sum, tools.go naming the
# package), into the cache shared by every clone on the machine.
#
#   gobuild CACHE NAME MODULE PACKAGE VERSION_VAR [CGO_ENABLED]
#
# The binary goes to CACHE/bin/NAME (replaced atomically), with the stamp
# CACHE/stamps/NAME-<version>-<hash>: <version> is MODULE's in go.mod, <hash> covers
# every file of the pinning module and these scripts. With the stamp present nothing is
# built. The version reaches VERSION_VAR (package.Var) through -ldflags -X, and the
# new binary must print it for `NAME --version` before it replaces the old one.
# Clones building the same peer at once wait on a lock; any failure says what failed
# and returns non-zero (build.sh runs under set -e).

gobuild() {
    local cache="$1" name="$2" module="$3" package="$4" version_var="$5" cgo="${6:-0}"
    local here version inputs stamp tmp out start
    here="$(pwd)"
    version="$(awk -v m="$module" '$1 == "require" && $2 == m { print $3; exit } $1 == m { print $2; exit }' go.mod)"
    [[ "$version" == v* ]] || { echo "peers/$name: $here/go.mod does not pin $module" >&2; return 1; }
    inputs="$(find . "${BASH_SOURCE[0]}" -type f \( -name '*.go' -o -name 'go.*' -o -name '*.sh' \) -print0 \
              | LC_ALL=C sort -z | xargs -0 cat | sha256sum | cut -c1-16)"
    stamp="$cache/stamps/$name-$version-$inputs"
    [[ -e "$stamp" && -x "$cache/bin/$name" ]] && return 0

    mkdir -p "$cache/bin" "$cache/stamps"
    exec 9>"$cache/stamps/$name.lock"
    flock 9  # another clone may be building it right now
    if [[ ! -e "$stamp" || ! -x "$cache/bin/$name" ]]; then
        command -v go >/dev/null || { echo "peers/$name: no go on PATH" >&2; return 1; }
        echo "peers/$name: building $package $version (minutes, once)" >&2
        start=$SECONDS
        tmp="$(mktemp "$cache/bin/.$name.XXXXXX")"
        # GOTOOLCHAIN=local: fail here rather than fetch another Go behind our back.
        if ! CGO_ENABLED="$cgo" GOTOOLCHAIN=local GOFLAGS="-buildvcs=false -mod=readonly" \
                go build -trimpath -ldflags "-s -w -X $version_var=$version" -o "$tmp" "$package"; then
            rm -f "$tmp"
            echo "peers/$name: FAILED: go build $package ($version) in $here" >&2
            return 1
        fi
        out="$(env -u CNI_COMMAND "$tmp" --version </dev/null 2>&1)" || true
        if [[ "$out" != *"$version"* ]]; then
            rm -f "$tmp"
            echo "peers/$name: FAILED: the new binary's --version says '$out', not $version" >&2
            return 1
        fi
        mv -f "$tmp" "$cache/bin/$name"
        rm -f "$cache/stamps/$name"-v*
        touch "$stamp"
        echo "peers/$name: $version built in $((SECONDS - start)) s" >&2
    fi
    exec 9>&-
}
