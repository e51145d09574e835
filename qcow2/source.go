package qcow2

import (
	"context"
	"fmt"
	"strconv"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Format is qcow2 as a sources.Format. Backing opens a backing file (any
// format: qcow2, VMDK, raw) next to the image; cmd sets it to the
// registry's OpenIn. Without it, images with a backing file are refused.
type Format struct {
	Backing func(ctx context.Context, fsys sources.FS, name string, opts sources.Options) (*sources.Image, error)
}

// Name implements sources.Format.
func (Format) Name() string { return "qcow2" }

// Probe implements sources.Format.
func (Format) Probe(head []byte, _ string) bool {
	return len(head) >= 8 && string(head[:4]) == Magic && (head[7] == 2 || head[7] == 3) &&
		head[4] == 0 && head[5] == 0 && head[6] == 0
}

type chainKey struct{}

// Open implements sources.Format.
func (fm Format) Open(ctx context.Context, fsys sources.FS, name string, f sources.File, opts sources.Options) (*sources.Image, error) {
	desc := fsys.Describe(name)
	im, err := openImage(desc, f, f.Size())
	if err != nil {
		f.Close()
		return nil, err
	}
	im.closers = append(im.closers, f.Close)
	h := im.h
	layer := sources.Layer{
		File: desc, Format: "qcow2", Allocated: f.Size(), Parent: h.BackingFile,
		Props: map[string]string{
			"version":      strconv.Itoa(int(h.Version)),
			"cluster_size": strconv.FormatInt(im.cs, 10),
		},
	}
	if h.CompressionType == CompressionZstd {
		layer.Props["compression_type"] = "zstd"
	} else {
		layer.Props["compression_type"] = "zlib"
	}
	if h.BackingFormat != "" {
		layer.Props["backing_format"] = h.BackingFormat
	}
	if h.Incompatible&IncompatDirty != 0 {
		layer.Props["dirty"] = "true"
	}
	info := sources.Info{Format: "qcow2", VirtualSize: im.size, Layers: []sources.Layer{layer}}
	if h.BackingFile != "" {
		if fm.Backing == nil {
			im.Close()
			return nil, fmt.Errorf("%s: has backing file %q but no way to open it", desc, h.BackingFile)
		}
		chain, _ := ctx.Value(chainKey{}).([]string)
		chain = append(append([]string(nil), chain...), desc)
		if err := checkChain(chain, fsys.Describe(h.BackingFile)); err != nil {
			im.Close()
			return nil, fmt.Errorf("%s: %w", desc, err)
		}
		bctx := context.WithValue(ctx, chainKey{}, chain)
		back, err := fm.Backing(bctx, fsys, h.BackingFile, sources.Options{Format: h.BackingFormat, AllowStaleChain: opts.AllowStaleChain})
		if err != nil {
			im.Close()
			return nil, fmt.Errorf("%s: opening backing file %q: %w", desc, h.BackingFile, err)
		}
		im.backing = back
		im.closers = append(im.closers, back.Close)
		info.Layers = append(info.Layers, back.Info.Layers...)
	}
	return &sources.Image{Device: im, Info: info}, nil
}
