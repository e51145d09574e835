package qcow2

import (
	"bytes"
	"fmt"
	"io"
	"runtime"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// codec compresses and decompresses single clusters. qcow2 stores deflate
// clusters as raw deflate streams (no zlib header) and zstd clusters as one
// zstd frame; decompression stops once a whole cluster has come out, since
// the bytes after a compressed cluster may belong to the next one.
type codec struct {
	typ   uint8
	level int

	flateW sync.Pool // *flate.Writer
	flateR sync.Pool // io.ReadCloser (flate.Resetter)
	zstdR  sync.Pool // *zstd.Decoder
	zstdW  *zstd.Encoder
	once   sync.Once
	zerr   error
}

func newCodec(typ uint8, level int) *codec { return &codec{typ: typ, level: level} }

// parseCompression maps a user's name to a compression type.
func parseCompression(name string) (uint8, bool, error) {
	switch name {
	case "", "none", "off":
		return 0, false, nil
	case "deflate", "zlib":
		return CompressionDeflate, true, nil
	case "zstd":
		return CompressionZstd, true, nil
	}
	return 0, false, fmt.Errorf("qcow2: unknown compression %q (want deflate or zstd)", name)
}

// compress appends the compressed form of src to dst.
func (c *codec) compress(dst, src []byte) ([]byte, error) {
	switch c.typ {
	case CompressionZstd:
		c.once.Do(func() {
			lvl := zstd.SpeedFastest
			if c.level > 0 {
				lvl = zstd.EncoderLevelFromZstd(c.level)
			}
			c.zstdW, c.zerr = zstd.NewWriter(nil, zstd.WithEncoderLevel(lvl),
				zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)), zstd.WithEncoderCRC(false))
		})
		if c.zerr != nil {
			return nil, c.zerr
		}
		return c.zstdW.EncodeAll(src, dst), nil
	default:
		buf := bytes.NewBuffer(dst)
		w, _ := c.flateW.Get().(*flate.Writer)
		if w == nil {
			lvl := 1 // fast by default: klauspost's level 1 still beats zlib's ratio on disk data
			if c.level > 0 {
				lvl = min(c.level, 9)
			}
			var err error
			if w, err = flate.NewWriter(buf, lvl); err != nil {
				return nil, err
			}
		} else {
			w.Reset(buf)
		}
		if _, err := w.Write(src); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
		c.flateW.Put(w)
		return buf.Bytes(), nil
	}
}

// decompress fills dst (one cluster) from the compressed bytes src.
func (c *codec) decompress(dst, src []byte) error {
	switch c.typ {
	case CompressionZstd:
		d, _ := c.zstdR.Get().(*zstd.Decoder)
		if d == nil {
			var err error
			d, err = zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
				zstd.WithDecoderMaxMemory(64<<20), zstd.WithDecoderMaxWindow(32<<20))
			if err != nil {
				return err
			}
		}
		if err := d.Reset(bytes.NewReader(src)); err != nil {
			d.Close()
			return fmt.Errorf("zstd: %w", err)
		}
		_, err := io.ReadFull(d, dst)
		c.zstdR.Put(d)
		if err != nil {
			return fmt.Errorf("zstd: %w", err)
		}
		return nil
	default:
		r, _ := c.flateR.Get().(io.ReadCloser)
		if r == nil {
			r = flate.NewReader(bytes.NewReader(src))
		} else if err := r.(flate.Resetter).Reset(bytes.NewReader(src), nil); err != nil {
			return err
		}
		_, err := io.ReadFull(r, dst)
		c.flateR.Put(r)
		if err != nil {
			return fmt.Errorf("deflate: %w", err)
		}
		return nil
	}
}
