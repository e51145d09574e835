// Package plugins is vmdk2kvm's fixer plugin protocol: a fixer is a separate
// executable speaking gRPC through hashicorp/go-plugin. The package holds the
// handshake, the SDK third parties use to write a fixer, and the host side that
// discovers, verifies, launches and supervises plugins and brokers the Guest API
// to them.
//
// # Writing a fixer
//
// A fixer describes itself and plans Changes by reading the guest; the SDK turns
// the plan into actions with human sentences and unified diffs for PLAN, and
// performs exactly those changes through the Guest API for FIX. A complete
// fixer:
//
//	package main
//
//	import (
//		"context"
//
//		"github.com/vmdk2kvm/vmdk2kvm/plugins"
//	)
//
//	type motd struct{}
//
//	func (motd) Describe() plugins.Description {
//		return plugins.Description{Name: "motd", Version: "1.0.0",
//			Summary: "says hello", OSTypes: []string{"linux"}}
//	}
//
//	func (motd) Plan(ctx context.Context, g *plugins.Guest) ([]plugins.Change, error) {
//		old, err := g.ReadFileIfExists(ctx, "/etc/motd")
//		if err != nil {
//			return nil, err
//		}
//		want := []byte("Migrated to KVM by vmdk2kvm\n")
//		return plugins.EditFile("Write a migration notice to /etc/motd.", "/etc/motd", old, want, 0o644), nil
//	}
//
//	func main() { plugins.Serve(motd{}) }
//
// Name the binary vmdk2kvm-fixer-<name> and put it in a plugin directory (see
// SearchPath). A fixer must be idempotent: planning again after applying its
// plan must return no changes. Every mutation a plugin makes through the Guest
// API is recorded by the host and shows in the report.
//
// # Protocol
//
// proto/fixer.proto defines two services: Fixer (served by plugins: Describe,
// Plan, Apply) and Guest (served by the host to each plugin through go-plugin's
// GRPCBroker, and by the vmdk2kvm-guest helper, which owns the libguestfs handle,
// to the host). Plugins in other languages implement Fixer and go-plugin's
// handshake (see Handshake).
package plugins

import (
	"context"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"

	pb "github.com/vmdk2kvm/vmdk2kvm/plugins/proto"
)

// ProtocolVersion is the version of the fixer protocol; bumped on breaking changes.
const ProtocolVersion = 1

// PluginName is the name of the Fixer in go-plugin's plugin set.
const PluginName = "fixer"

// BinaryPrefix starts the file name of every fixer plugin.
const BinaryPrefix = "vmdk2kvm-fixer-"

// Handshake is the go-plugin handshake a plugin and the host must share. It is
// not a security measure (see SHA-256 pinning for that); it keeps a user from
// running a plugin by hand and the host from talking to a foreign binary.
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "VMDK2KVM_PLUGIN",
	MagicCookieValue: "fixer-4f6c1e2a9b7d",
}

// grpcPlugin adapts the Fixer service to go-plugin. On the plugin side it holds
// the implementation; on the host side it produces a *fixerClient.
type grpcPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	impl pb.FixerServer
}

func (p *grpcPlugin) GRPCServer(broker *plugin.GRPCBroker, s *grpc.Server) error {
	if srv, ok := p.impl.(*fixerServer); ok {
		srv.broker = broker
	}
	pb.RegisterFixerServer(s, p.impl)
	return nil
}

func (p *grpcPlugin) GRPCClient(_ context.Context, broker *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return &fixerClient{client: pb.NewFixerClient(c), broker: broker}, nil
}

type fixerClient struct {
	client pb.FixerClient
	broker *plugin.GRPCBroker
}
