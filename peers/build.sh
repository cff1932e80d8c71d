#!/usr/bin/env bash
# Builds the lab's real peers (flanneld, kube-apiserver, ...) from their Go modules,
# once, into a cache outside the repository that every clone on this machine shares.
# Each peers/<name>/build.sh receives the folder to fill ($1) and builds only when that
# folder lacks its stamp; nothing of another project's source is kept in this repository.
# The tests find the binaries through udpflannel/lab/peers.py.
set -euo pipefail
shopt -s nullglob
here="$(cd "$(dirname "$0")" && pwd)"
cache="${UDPFLANNEL_PEERS:-/var/cache/udpflannel-peers}"
mkdir -p "$cache"
for script in "$here"/*/build.sh; do
    bash "$script" "$cache"
done
