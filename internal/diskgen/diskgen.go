// Package diskgen writes deterministic test disks with a realistic mix of
// content, so tests and benchmarks share one shape of data: about 40% random
// bytes, 20% compressible text, 30% holes and 10% written zeros, in runs of
// 256 KiB to 2 MiB (4 KiB aligned). The same seed and size give the same
// bytes on every machine.
package diskgen

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
)

// Kind is what a run holds.
type Kind int

const (
	Random Kind = iota
	Text
	Hole
	Zeros
)

// Run is one stretch of the generated disk.
type Run struct {
	Off, Len int64
	Kind     Kind
}

// Layout returns the runs of a disk of the given size and seed.
func Layout(size int64, seed uint64) []Run {
	r := rand.New(rand.NewPCG(seed, 0x766d646b))
	var runs []Run
	for off := int64(0); off < size; {
		n := (256<<10 + r.Int64N(2<<20-256<<10+1)) &^ 4095
		n = min(n, size-off)
		var k Kind
		switch p := r.IntN(100); {
		case p < 40:
			k = Random
		case p < 60:
			k = Text
		case p < 90:
			k = Hole
		default:
			k = Zeros
		}
		runs = append(runs, Run{off, n, k})
		off += n
	}
	return runs
}

// Fill writes the content of a run into p (len(p) == run.Len), for the
// kinds that have content; holes and zeros are left as zeros.
type filler struct {
	rnd  *rand.ChaCha8
	text []byte
}

func newFiller(seed uint64) *filler {
	var key [32]byte
	for i := range key {
		key[i] = byte(seed >> (8 * (i % 8)))
	}
	f := &filler{rnd: rand.NewChaCha8(key)}
	words := strings.Fields("the quick brown fox jumps over lazy dog virtual machine disk sector grain " +
		"kernel initramfs datastore snapshot extent cluster migration vmware kvm qemu block " +
		"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor")
	r := rand.New(rand.NewPCG(seed, 1))
	var b strings.Builder
	for b.Len() < 4<<20 {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(12) == 0 {
			b.WriteString(".\n")
		} else {
			b.WriteByte(' ')
		}
	}
	f.text = []byte(b.String())
	return f
}

// Write creates (or truncates) path and writes the disk into it.
func Write(ctx context.Context, path string, size int64, seed uint64) ([]Run, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		return nil, err
	}
	runs := Layout(size, seed)
	fl := newFiller(seed)
	buf := make([]byte, 2<<20)
	for i, run := range runs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p := buf[:run.Len]
		switch run.Kind {
		case Hole:
			continue
		case Zeros:
			clear(p)
		case Random:
			fl.rnd.Read(p)
		case Text:
			start := int64(i*7919) % (int64(len(fl.text)) - run.Len)
			copy(p, fl.text[start:])
		}
		if _, err := f.WriteAt(p, run.Off); err != nil {
			return nil, fmt.Errorf("%s: writing run at %d: %w", path, run.Off, err)
		}
	}
	return runs, f.Close()
}
