//go:build tools

// Package peers pins flanneld, the real peer of the lab's interop tests. Nothing here is
// built into udpflannel: build.sh compiles github.com/flannel-io/flannel (its main
// package, unchanged) from this module, so go.mod and go.sum fix every dependency.
package peers

import _ "github.com/flannel-io/flannel"
