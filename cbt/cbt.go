// Package cbt answers "what changed since last time?" for a virtual disk, as
// a list of extents, and keeps the sync state that makes a warm migration
// resumable.
//
// A Provider is bound to one disk at one point in time (a vSphere snapshot, a
// VMDK snapshot delta, an NBD export with a dirty bitmap, or any device for
// the block-hash manifest). Given the token stored after the previous round
// (a CBT change ID, a snapshot ID, ...) it returns the ranges that may differ
// since then and the token to store after this round. An empty token means
// "no previous round": the provider returns every allocated range of the
// disk and marks the result Full, so that a sync zeroes everything else.
//
// The providers:
//   - VSphere: QueryChangedDiskAreas, paged, with the "*" baseline and
//     change-ID reset detection;
//   - Delta: the allocated grains of the snapshot delta layers that were
//     frozen since the previous round (works without vCenter);
//   - Bitmap: a QEMU dirty bitmap read over NBD (qemu:dirty-bitmap:NAME);
//   - Hash: a manifest of per-block hashes of the replica, the last resort
//     for any source (the source is read in full, only differing blocks are
//     copied).
//
// State (state.go) is the per-disk record of what the replica holds; it is
// written atomically and only after the replica has been flushed.
package cbt

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Provider reports the changed ranges of one disk.
type Provider interface {
	// Name identifies the provider in the state and in reports.
	Name() string
	// Changed returns the ranges that changed since the point identified by
	// since ("" = no previous round).
	Changed(ctx context.Context, since string) (Result, error)
}

// Result is a provider's answer.
type Result struct {
	// Extents are sorted, non-overlapping ranges (Type Data).
	Extents []block.Extent
	// Token identifies this point in time; the sync stores it after the
	// replica has been flushed and passes it as since next round.
	Token string
	// Full says Extents are the whole disk's allocated areas, not a delta:
	// the replica must read as zeros everywhere else.
	Full bool
	// Warning explains a forced full resync (e.g. a change-ID reset).
	Warning string
}

// Bytes returns the total length of the extents.
func (r Result) Bytes() int64 { return block.Sum(r.Extents, block.Data, block.Zero, block.Hole) }

// Allocated lists every extent of dev that is not a hole, normalized: what
// a full resync has to copy.
func Allocated(ctx context.Context, dev block.Device) ([]block.Extent, error) {
	var out []block.Extent
	err := block.Walk(ctx, dev, 0, dev.Size(), 0, func(e block.Extent) error {
		if e.Type != block.Hole {
			out = append(out, e)
		}
		return nil
	})
	return Normalize(out, dev.Size()), err
}

// Normalize sorts extents, clips them to [0, size), merges overlapping and
// touching ones and marks them Data. Providers use it on whatever their
// source reports.
func Normalize(exts []block.Extent, size int64) []block.Extent {
	in := make([]block.Extent, 0, len(exts))
	for _, e := range exts {
		off, n := block.ClipRange(size, e.Off, e.Len)
		if n > 0 {
			in = append(in, block.Extent{Off: off, Len: n, Type: block.Data})
		}
	}
	sort.Slice(in, func(i, j int) bool { return in[i].Off < in[j].Off })
	out := in[:0]
	for _, e := range in {
		if n := len(out); n > 0 && e.Off <= out[n-1].End() {
			if e.End() > out[n-1].End() {
				out[n-1].Len = e.End() - out[n-1].Off
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

// Align widens every extent to multiples of gran (a power of two) and merges
// the result: block-granular trackers report blocks, not bytes.
func Align(exts []block.Extent, gran, size int64) []block.Extent {
	out := make([]block.Extent, 0, len(exts))
	for _, e := range exts {
		s := e.Off &^ (gran - 1)
		t := (e.End() + gran - 1) &^ (gran - 1)
		out = append(out, block.Extent{Off: s, Len: t - s, Type: block.Data})
	}
	return Normalize(out, size)
}

// ChangeIDEpoch returns the UUID part of a vSphere change ID
// ("52 de ... 7e/4711" → "52 de ... 7e"). A change ID whose epoch differs from
// the stored one means change tracking was reset (CBT disabled and enabled,
// storage vMotion, ...): every earlier change ID is meaningless.
func ChangeIDEpoch(id string) string {
	if i := strings.LastIndexByte(id, '/'); i >= 0 {
		return id[:i]
	}
	return id
}

// Restrict returns a view of dev whose Extents report Hole outside the given
// sorted ranges and dev's own extents inside them. A full resync copies the
// whole disk through it with a non-zeroed target: what the provider said is
// unallocated is zeroed in the replica without being read.
func Restrict(dev block.Device, ranges []block.Extent) block.Device {
	return &restricted{Device: dev, ranges: ranges}
}

type restricted struct {
	block.Device
	ranges []block.Extent
}

func (r *restricted) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	off, length = block.ClipRange(r.Size(), off, length)
	if length == 0 {
		return nil, nil
	}
	end := off + length
	var out []block.Extent
	pos := off
	i := sort.Search(len(r.ranges), func(i int) bool { return r.ranges[i].End() > off })
	for ; i < len(r.ranges) && r.ranges[i].Off < end; i++ {
		s, t := max(r.ranges[i].Off, off), min(r.ranges[i].End(), end)
		if s > pos {
			out = block.Append(out, block.Extent{Off: pos, Len: s - pos, Type: block.Hole})
		}
		sub, err := r.Device.Extents(ctx, s, t-s)
		if err != nil {
			return nil, err
		}
		if err := block.Check(sub, s, t-s); err != nil {
			return nil, fmt.Errorf("restricted device: %w", err)
		}
		for _, e := range sub {
			out = block.Append(out, e)
		}
		pos = t
	}
	if pos < end {
		out = block.Append(out, block.Extent{Off: pos, Len: end - pos, Type: block.Hole})
	}
	return out, nil
}
