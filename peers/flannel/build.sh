#!/usr/bin/env bash
# flanneld, the real peer of the interop tests (tests/integration/test_real_flanneld.py),
# at the release go.mod pins, with cgo on (its udp backend's proxy is C), into
# $1/bin/flanneld. Fast and silent when that exact build is cached. See ../gobuild.sh.
set -euo pipefail
cd "$(dirname "$0")"
. ../gobuild.sh
gobuild "${1:?usage: build.sh CACHE}" flanneld github.com/flannel-io/flannel \
    github.com/flannel-io/flannel github.com/flannel-io/flannel/pkg/version.Version 1
