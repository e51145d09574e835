// Command badfixer is a misbehaving fixer plugin for vmdk2kvm's tests. What it
// does wrong is chosen by its file name (vmdk2kvm-fixer-<mode>):
//
//	crash-describe  panics while answering Describe
//	crash-plan      panics while answering Plan
//	hang-describe   never answers Describe
//	hang-plan       never answers Plan
//	badshake        speaks plugin protocol version 99
//	write-in-plan   tries to write the guest while planning (must be refused)
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-plugin"

	"github.com/vmdk2kvm/vmdk2kvm/plugins"
)

type bad struct{ mode string }

func (b bad) Describe() plugins.Description {
	switch b.mode {
	case "crash-describe":
		panic("badfixer: crashing in Describe on purpose")
	case "hang-describe":
		time.Sleep(time.Hour)
	}
	return plugins.Description{Name: b.mode, Version: "0.0.1", Summary: "misbehaves: " + b.mode, OSTypes: []string{"linux"}, Order: 90}
}

func (b bad) Plan(ctx context.Context, g *plugins.Guest) ([]plugins.Change, error) {
	switch b.mode {
	case "crash-plan":
		panic("badfixer: crashing in Plan on purpose")
	case "hang-plan":
		time.Sleep(time.Hour)
	case "write-in-plan":
		if err := g.WriteFile(ctx, "/etc/badfixer", []byte("planned write\n"), 0o644); err != nil {
			return nil, fmt.Errorf("write while planning was refused: %w", err)
		}
	}
	return nil, nil
}

func main() {
	mode := strings.TrimPrefix(filepath.Base(os.Args[0]), plugins.BinaryPrefix)
	if mode == "badshake" {
		hs := plugins.Handshake
		hs.ProtocolVersion = 99
		plugin.Serve(&plugin.ServeConfig{HandshakeConfig: hs, Plugins: plugin.PluginSet{}, GRPCServer: plugin.DefaultGRPCServer})
		return
	}
	plugins.Serve(bad{mode: mode})
}
