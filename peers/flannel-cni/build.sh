#!/usr/bin/env bash
# flannel's CNI plugin (type "flannel") into $1/bin/flannel, from the last release of
# containernetworking/plugins that carried it (see tools.go). See ../gobuild.sh.
set -euo pipefail
cd "$(dirname "$0")"
. ../gobuild.sh
gobuild "${1:?usage: build.sh CACHE}" flannel github.com/containernetworking/plugins \
    github.com/containernetworking/plugins/plugins/meta/flannel \
    github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion
