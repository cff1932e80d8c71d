//go:build tools

// Package peers pins flannel's CNI plugin (CNI type "flannel"), the real counterpart of
// udpflannel's plugin in the lab. Its home, github.com/flannel-io/cni-plugin, is not
// served by the Go module proxy; v0.9.1 of containernetworking/plugins is the last
// release that still carried it (plugins/meta/flannel, removed in v1.0.0).
package peers

import _ "github.com/containernetworking/plugins/plugins/meta/flannel"
