// Package vmdk reads VMware virtual disks (VMDK) and their snapshot chains as
// one block.Device: FLATTEN in the design.
//
// It understands text descriptors and descriptors embedded in a monolithic
// file, and every extent kind VMware writes to files: hosted sparse ("KDMV":
// monolithicSparse, twoGbMaxExtentSparse, streamOptimized with compressed
// grains and markers), FLAT and VMFS (thick and thin), ZERO, COWD (ESX
// vmfsSparse redo logs) and seSparse (ESXi 5.5+ snapshots). Raw device
// mappings are refused: they cannot be read from a file.
//
// Every file (descriptor, extents, parents) is opened through a
// sources.FS, relative to the file that names it, so a chain is read in
// place wherever it lives (local folder, datastore over HTTP, SFTP).
//
// A Chain maps each byte to the topmost layer holding it; Extents are exact
// (a Hole only where no layer has data; zeroed grains, unmapped seSparse
// grains and ZERO extents are Zero and mask the layers below), and
// LayerExtents gives one delta's own allocation, which is what changed since
// its snapshot was taken.
//
// Where qemu is not a faithful oracle this package follows the format:
// ZERO extents keep their place, RDONLY and NOACCESS extents are part of the
// disk, absolute parent names fall back to the base name next to the child,
// and a COWD grain table entry of 1 is a zeroed grain (see newCOWDExtent).
//
// Reads are safe from many goroutines: grain tables are cached per extent,
// runs of grains contiguous in the file are read with one ReadAt, and
// compressed grains are inflated by the reading goroutine, so a parallel
// copy inflates on every core.
package vmdk

import (
	"bytes"
	"context"
	"encoding/binary"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Format is the VMDK format for a sources.Registry.
type Format struct{}

// Name implements sources.Format.
func (Format) Name() string { return "vmdk" }

// Probe implements sources.Format: a KDMV, COWD or seSparse header, or a
// text descriptor.
func (Format) Probe(head []byte, _ string) bool {
	if len(head) >= 4 {
		switch binary.LittleEndian.Uint32(head) {
		case magicKDMV, magicCOWD:
			return true
		}
	}
	if len(head) >= 8 && binary.LittleEndian.Uint64(head) == magicSESparse {
		return true
	}
	return LooksLikeDescriptor(head)
}

// LooksLikeDescriptor reports whether the start of a file is a VMDK text
// descriptor: text (up to the first NUL: qemu pads descriptor files with
// NULs) that starts with "# Disk DescriptorFile" or has a createType= line
// in its first 4 KiB.
func LooksLikeDescriptor(head []byte) bool {
	h := head[:min(len(head), 4096)]
	if i := bytes.IndexByte(h, 0); i >= 0 {
		h = h[:i]
	}
	s := strings.TrimLeft(strings.TrimPrefix(string(h), "\ufeff"), " \t\r\n")
	if strings.HasPrefix(s, "# Disk DescriptorFile") {
		return true
	}
	for _, line := range strings.Split(s, "\n") {
		k, _, ok := strings.Cut(strings.TrimSpace(line), "=")
		if ok && strings.TrimSpace(k) == "createType" {
			return true
		}
	}
	return false
}

// Open implements sources.Format.
func (Format) Open(ctx context.Context, fsys sources.FS, name string, f sources.File, opts sources.Options) (*sources.Image, error) {
	c, err := Open(ctx, fsys, name, f, Options{AllowStaleChain: opts.AllowStaleChain})
	if err != nil {
		return nil, err
	}
	return &sources.Image{Device: c, Info: c.Info()}, nil
}
