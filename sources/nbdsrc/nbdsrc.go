// Package nbdsrc opens NBD exports as sources: nbd://, nbds://, nbd+unix://
// and nbds+unix:// URIs become block devices through the project's own NBD
// client, so any NBD server (nbdkit, qemu-nbd, VDDK through nbdkit, another
// `vmdk2kvm serve`) is a source with exact extents (base:allocation) and
// parallel reads (multi-conn).
package nbdsrc

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/nbd"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Opener is the sources.DeviceOpener for NBD URIs.
type Opener struct {
	// Client tunes every connection (the zero value: defaults).
	Client nbd.ClientOptions
}

// Schemes implements sources.DeviceOpener.
func (Opener) Schemes() []string { return []string{"nbd", "nbds", "nbd+unix", "nbds+unix"} }

// OpenDevice implements sources.DeviceOpener. The export is the disk, byte
// for byte: no format is probed inside it.
func (o Opener) OpenDevice(ctx context.Context, location string, opts sources.Options) (*sources.Image, error) {
	if opts.Format != "" && opts.Format != "raw" && opts.Format != "nbd" {
		return nil, fmt.Errorf("%s: an NBD export is read as the disk itself; format %q cannot be forced on it: %w", location, opts.Format, sources.ErrUnsupported)
	}
	c, err := nbd.Dial(ctx, location, o.Client)
	if err != nil {
		return nil, err
	}
	t := c.Target()
	props := map[string]string{
		"nbd.export":      t.Export,
		"nbd.flags":       fmt.Sprintf("0x%04x", c.Flags()),
		"nbd.read_only":   strconv.FormatBool(c.ReadOnly()),
		"nbd.connections": strconv.Itoa(c.Connections()),
		"nbd.structured":  strconv.FormatBool(c.Structured()),
		"nbd.contexts":    strings.Join(c.Contexts(), ","),
		"nbd.tls":         strconv.FormatBool(t.TLS),
	}
	return &sources.Image{Device: c, Info: sources.Info{
		Format:      "nbd",
		VirtualSize: c.Size(),
		Layers:      []sources.Layer{{File: t.String(), Format: "nbd"}},
		Props:       props,
	}}, nil
}
