//go:build tools

// Package deps pins the modules the project builds on, so that go.mod names
// them before every package that uses them exists. It is never built.
package deps

import (
	_ "github.com/digitalocean/go-libvirt"
	_ "github.com/hashicorp/go-plugin"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/pkg/sftp"
	_ "github.com/vmware/govmomi"
	_ "github.com/vmware/govmomi/simulator"
	_ "golang.org/x/crypto/ssh"
	_ "google.golang.org/grpc"
	_ "google.golang.org/protobuf/proto"
	_ "libvirt.org/go/libvirtxml"
)
