package cbt

import (
	"context"
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// StateDirty is the flag of a qemu:dirty-bitmap context for a dirty range.
const StateDirty = 1

// StatusExport is an NBD export that answers block status for metadata
// contexts (nbd.Client).
type StatusExport interface {
	block.Device
	BlockStatus(ctx context.Context, name string, off, length int64) ([]nbd.Status, error)
}

// Bitmap is the provider for sources that are already qemu images: a
// persistent dirty bitmap exported by qemu-nbd -B NAME (the
// qemu:dirty-bitmap:NAME metadata context) lists what was written since the
// bitmap was last cleared. Since is the token of that point (the caller
// clears the bitmap after a committed round and moves on to Token); a round
// asked about another point, or the first round, gets the export's
// allocation (base:allocation) instead.
type Bitmap struct {
	Export StatusExport
	Bitmap string // bitmap name
	Since  string // the point the bitmap's dirty bits are relative to
	Token  string // this point
}

// Name implements Provider.
func (b *Bitmap) Name() string { return "qemu-dirty-bitmap" }

// Changed implements Provider.
func (b *Bitmap) Changed(ctx context.Context, since string) (Result, error) {
	size := b.Export.Size()
	res := Result{Token: b.Token}
	if since == "" || since != b.Since {
		res.Full = true
		if since != "" {
			res.Warning = fmt.Sprintf("dirty bitmap %s tracks changes since %q, the replica is at %q: full resync", b.Bitmap, b.Since, since)
		}
		var err error
		res.Extents, err = Allocated(ctx, b.Export)
		return res, err
	}
	ctxName := "qemu:dirty-bitmap:" + b.Bitmap
	for off := int64(0); off < size; {
		n := min(size-off, 1<<30)
		st, err := b.Export.BlockStatus(ctx, ctxName, off, n)
		if err != nil {
			return Result{}, fmt.Errorf("dirty bitmap %s: %w", b.Bitmap, err)
		}
		for _, s := range st {
			if s.Flags&StateDirty != 0 {
				res.Extents = append(res.Extents, block.Extent{Off: s.Off, Len: s.Len, Type: block.Data})
			}
		}
		off += n
	}
	res.Extents = Normalize(res.Extents, size)
	return res, nil
}
