// Package sinks defines where a conversion writes: an Output is a block.Writer
// that appears under its final name only when Commit succeeds, and leaves
// nothing behind on Abort. Each output format (raw, qcow2, nbd) is a Format
// that creates Outputs; cmd builds a Registry of the formats it supports.
package sinks

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Output is a fresh image being written. A new Output reads as all zeros, so
// a copy may skip holes and zero ranges entirely.
type Output interface {
	block.Writer
	// Commit flushes everything, finishes the format's metadata and moves the
	// output to its final name.
	Commit(ctx context.Context) error
	// Abort discards the output; the final name is never created.
	Abort() error
}

// Options tune an output format; a format ignores what does not apply to it.
type Options struct {
	ClusterSize   int64  // qcow2 cluster size in bytes (0: the format's default)
	Compress      string // "", "deflate" or "zstd"
	CompressLevel int    // 0: the compressor's default
	Preallocation string // "", "off" or "metadata"
	BackingFile   string // qcow2 overlays: the backing image's name
	BackingFormat string
	Workers       int  // parallelism the format may use (compression)
	NoSync        bool // skip fsync at Commit (qemu-img convert's cache=unsafe)
}

// Format creates outputs of one image format.
type Format interface {
	Name() string
	Create(ctx context.Context, path string, size int64, opts Options) (Output, error)
}

// Registry holds the output formats a binary supports.
type Registry struct{ formats map[string]Format }

// NewRegistry returns a registry of the given formats.
func NewRegistry(formats ...Format) *Registry {
	r := &Registry{formats: map[string]Format{}}
	for _, f := range formats {
		r.formats[f.Name()] = f
	}
	return r
}

// Names lists the registered formats.
func (r *Registry) Names() []string {
	var names []string
	for n := range r.formats {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Create creates an output of the named format.
func (r *Registry) Create(ctx context.Context, format, path string, size int64, opts Options) (Output, error) {
	f, ok := r.formats[format]
	if !ok {
		return nil, fmt.Errorf("output format %q is not supported (known: %s)", format, strings.Join(r.Names(), ", "))
	}
	return f.Create(ctx, path, size, opts)
}
