package adler32

import (
	"hash/adler32"
	"math/rand/v2"
	"testing"
)

// Against hash/adler32, on lengths around every boundary (the 16- and
// 32-byte steps, the 5552-byte modulo bound, the 64 KiB vector call), with
// random bytes and with 0xff everywhere (the largest sums, where an
// overflow would show).
func TestChecksum(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var lengths []int
	for n := 0; n < 300000; n += 1 + n/7 {
		lengths = append(lengths, n)
	}
	lengths = append(lengths, 31, 32, 33, nmax, nmax+1, 65535, 65536, 65537, 2<<20)
	for _, n := range lengths {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		for _, off := range []int{0, 1} { // and unaligned
			if n < off {
				continue
			}
			if got, want := Checksum(b[off:]), adler32.Checksum(b[off:]); got != want {
				t.Fatalf("random, n=%d off=%d: %#x, want %#x", n, off, got, want)
			}
			if got, want := words(1, 0, b[off:]), adler32.Checksum(b[off:]); got != want {
				t.Fatalf("words, random, n=%d off=%d: %#x, want %#x", n, off, got, want)
			}
		}
		for i := range b {
			b[i] = 0xff
		}
		if got, want := Checksum(b), adler32.Checksum(b); got != want {
			t.Fatalf("0xff, n=%d: %#x, want %#x", n, got, want)
		}
		if got, want := words(1, 0, b), adler32.Checksum(b); got != want {
			t.Fatalf("words, 0xff, n=%d: %#x, want %#x", n, got, want)
		}
	}
}

func BenchmarkChecksum(b *testing.B) {
	p := make([]byte, 64<<10)
	for i := range p {
		p[i] = byte(i * 7)
	}
	b.Run("ours", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for range b.N {
			Checksum(p)
		}
	})
	b.Run("words", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for range b.N {
			words(1, 0, p)
		}
	})
	b.Run("hash-adler32", func(b *testing.B) {
		b.SetBytes(int64(len(p)))
		for range b.N {
			adler32.Checksum(p)
		}
	})
}
