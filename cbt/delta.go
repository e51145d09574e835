package cbt

import (
	"context"
	"fmt"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Layered is a snapshot chain that reports each layer's own allocation
// (sources/vmdk.Chain): for a delta, the grains written since the snapshot
// below it was taken.
type Layered interface {
	block.Device
	// Layers lists the chain, top first.
	Layers() []sources.Layer
	// LayerExtents is one layer's own map: Data/Zero where it holds grains,
	// Hole where reads fall through to its parent.
	LayerExtents(ctx context.Context, layer int, off, length int64) ([]block.Extent, error)
}

// Delta is the provider for snapshot chains without CBT (a standalone ESXi
// over SSH, no vCenter): each round freezes the running delta by taking a
// snapshot on top of it, and the grains of the deltas frozen since the
// previous round are exactly what changed. Chain is the chain as of the
// frozen point (its top is the newest frozen delta). The token names the
// top layer (file and content ID).
type Delta struct {
	Chain Layered
}

// Name implements Provider.
func (d *Delta) Name() string { return "snapshot-delta" }

// LayerToken identifies one layer of a chain.
func LayerToken(l sources.Layer) string { return l.File + "@" + l.ID }

// Changed implements Provider.
func (d *Delta) Changed(ctx context.Context, since string) (Result, error) {
	layers := d.Chain.Layers()
	if len(layers) == 0 {
		return Result{}, fmt.Errorf("snapshot-delta: the chain has no layers")
	}
	size := d.Chain.Size()
	res := Result{Token: LayerToken(layers[0])}
	k := -1
	for i, l := range layers {
		if LayerToken(l) == since {
			k = i
			break
		}
	}
	if k < 0 {
		// First round, or the synced layer is gone (consolidated): the
		// whole chain's allocation.
		res.Full = true
		if since != "" {
			res.Warning = fmt.Sprintf("the layer the replica was synced to (%s) is no longer in the chain: full resync", since)
		}
		var err error
		res.Extents, err = Allocated(ctx, d.Chain)
		return res, err
	}
	for i := 0; i < k; i++ {
		for off := int64(0); off < size; {
			n := min(size-off, 1<<30)
			exts, err := d.Chain.LayerExtents(ctx, i, off, n)
			if err != nil {
				return Result{}, fmt.Errorf("snapshot-delta: layer %s: %w", layers[i].File, err)
			}
			for _, e := range exts {
				if e.Type != block.Hole {
					res.Extents = append(res.Extents, e)
				}
			}
			off += n
		}
	}
	res.Extents = Normalize(res.Extents, size)
	return res, nil
}
