package cbt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sync/errgroup"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Hash is the last-resort provider for any source: it keeps a manifest of
// per-block SHA-256 hashes of the replica. Each round reads the source in
// full (holes and zero extents are hashed without reading), and reports the
// blocks whose hash differs from the manifest. The manifest is invalidated
// (removed) before the replica is written and rewritten after it is flushed,
// so a crash in between makes the next round rebuild it from the replica.
type Hash struct {
	Source    block.Device
	Replica   block.Device // read to rebuild a missing manifest; nil: everything changed
	Manifest  string       // path of the manifest file
	BlockSize int64        // default 256 KiB
	Workers   int

	next []byte // hashes of the source, written by Commit
}

const hashMagic = "V2KHASH1"

// Name implements Provider.
func (h *Hash) Name() string { return "block-hash" }

func (h *Hash) blockSize() int64 {
	if h.BlockSize <= 0 {
		return 256 << 10
	}
	return h.BlockSize
}

// Changed implements Provider. since is not needed: the manifest is the
// memory. The token is a digest of the manifest.
func (h *Hash) Changed(ctx context.Context, since string) (Result, error) {
	size, bs := h.Source.Size(), h.blockSize()
	src, err := HashDevice(ctx, h.Source, bs, h.Workers)
	if err != nil {
		return Result{}, fmt.Errorf("hashing the source: %w", err)
	}
	h.next = src
	sum := sha256.Sum256(src)
	res := Result{Token: "sha256:" + hex.EncodeToString(sum[:])}

	old, err := h.readManifest(size, bs)
	if err != nil && h.Replica != nil && h.Replica.Size() == size {
		res.Warning = fmt.Sprintf("block-hash manifest unusable (%v): rebuilt from the replica", err)
		old, err = HashDevice(ctx, h.Replica, bs, h.Workers)
		if err != nil {
			return Result{}, fmt.Errorf("hashing the replica: %w", err)
		}
	}
	if old == nil {
		// Nothing to compare with: every block is suspect.
		res.Full = true
		err = block.Walk(ctx, h.Source, 0, size, 0, func(e block.Extent) error {
			if e.Type == block.Data {
				res.Extents = append(res.Extents, block.Extent{Off: e.Off, Len: e.Len, Type: block.Data})
			}
			return nil
		})
		res.Extents = Normalize(res.Extents, size)
		return res, err
	}
	for i := 0; i*sha256.Size < len(src); i++ {
		a, b := src[i*sha256.Size:(i+1)*sha256.Size], old[i*sha256.Size:(i+1)*sha256.Size]
		if !bytes.Equal(a, b) {
			res.Extents = append(res.Extents, block.Extent{Off: int64(i) * bs, Len: bs, Type: block.Data})
		}
	}
	res.Extents = Normalize(res.Extents, size)
	return res, nil
}

// Prepare removes the manifest before the replica is written.
func (h *Hash) Prepare() error {
	if err := os.Remove(h.Manifest); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return SyncDir(filepath.Dir(h.Manifest))
}

// Commit writes the manifest of what the replica now holds. Call it after
// the replica is flushed.
func (h *Hash) Commit() error {
	if h.next == nil {
		return errors.New("block-hash: Commit without Changed")
	}
	var hdr [24]byte
	copy(hdr[:8], hashMagic)
	binary.LittleEndian.PutUint64(hdr[8:], uint64(h.Source.Size()))
	binary.LittleEndian.PutUint64(hdr[16:], uint64(h.blockSize()))
	return WriteFileAtomic(h.Manifest, append(hdr[:], h.next...), 0o644)
}

func (h *Hash) readManifest(size, bs int64) ([]byte, error) {
	f, err := os.Open(h.Manifest)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var hdr [24]byte
	if _, err := io.ReadFull(f, hdr[:]); err != nil {
		return nil, fmt.Errorf("%s: header: %w", h.Manifest, err)
	}
	if string(hdr[:8]) != hashMagic {
		return nil, fmt.Errorf("%s: not a block-hash manifest", h.Manifest)
	}
	msize, mbs := int64(binary.LittleEndian.Uint64(hdr[8:])), int64(binary.LittleEndian.Uint64(hdr[16:]))
	if msize != size || mbs != bs {
		return nil, fmt.Errorf("%s: manifest for size %d block %d, source has size %d block %d", h.Manifest, msize, mbs, size, bs)
	}
	want := (size + bs - 1) / bs * sha256.Size
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size()-24 != want {
		return nil, fmt.Errorf("%s: %d bytes of hashes, want %d", h.Manifest, st.Size()-24, want)
	}
	b := make([]byte, want)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("%s: %w", h.Manifest, err)
	}
	return b, nil
}

// HashDevice returns the concatenated SHA-256 of every bs-sized block of dev
// (the last one short). Blocks that the device reports as holes or zeros are
// hashed without reading.
func HashDevice(ctx context.Context, dev block.Device, bs int64, workers int) ([]byte, error) {
	size := dev.Size()
	n := (size + bs - 1) / bs
	out := make([]byte, n*sha256.Size)
	if workers <= 0 {
		workers = max(2, runtime.GOMAXPROCS(0))
	}
	zero := make([]byte, bs)
	zsum := sha256.Sum256(zero)
	g, gctx := errgroup.WithContext(ctx)
	idx := make(chan int64)
	g.Go(func() error {
		defer close(idx)
		for i := range n {
			select {
			case idx <- i:
			case <-gctx.Done():
				return gctx.Err()
			}
		}
		return nil
	})
	for range workers {
		g.Go(func() error {
			buf := make([]byte, bs)
			for i := range idx {
				off := i * bs
				l := min(bs, size-off)
				exts, err := dev.Extents(gctx, off, l)
				if err != nil {
					return fmt.Errorf("extents at %d: %w", off, err)
				}
				var s [sha256.Size]byte
				if block.Sum(exts, block.Data) == 0 {
					if l == bs {
						s = zsum
					} else {
						s = sha256.Sum256(zero[:l])
					}
				} else {
					p := buf[:l]
					if k, err := dev.ReadAt(p, off); k < len(p) {
						if err == nil {
							err = io.ErrUnexpectedEOF
						}
						return fmt.Errorf("reading at %d: %w", off, err)
					}
					s = sha256.Sum256(p)
				}
				copy(out[i*sha256.Size:], s[:])
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return out, nil
}
