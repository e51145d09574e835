package vmdk

import (
	"bytes"
	"compress/zlib"
	"hash/adler32"
	"math/rand/v2"
	"strings"
	"testing"
)

func TestInflate(t *testing.T) {
	data := []byte(strings.Repeat("grain ", 20000))
	var z bytes.Buffer
	w := zlib.NewWriter(&z)
	w.Write(data)
	w.Close()
	var in inflater
	out := make([]byte, len(data))
	if n, err := in.inflate(out, z.Bytes()); err != nil || n != len(data) || !bytes.Equal(out, data) {
		t.Fatalf("inflate: %d, %v", n, err)
	}
	bad := bytes.Clone(z.Bytes())
	bad[len(bad)-1] ^= 1
	if _, err := in.inflate(out, bad); err == nil || !strings.Contains(err.Error(), "Adler-32") {
		t.Fatalf("bad checksum: %v", err)
	}
	if _, err := in.inflate(out[:100], z.Bytes()); err == nil {
		t.Fatal("oversized stream accepted")
	}
	// Incompressible data: stored blocks only (the fast path), then with
	// a bad checksum, then too large for out.
	rnd := make([]byte, 200000)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range rnd {
		rnd[i] = byte(r.Uint32())
	}
	var zs bytes.Buffer
	w = zlib.NewWriter(&zs)
	w.Write(rnd)
	w.Close()
	if _, _, ok := storedOnly(make([]byte, len(rnd)), zs.Bytes()[2:]); !ok {
		t.Fatal("test setup: zlib did not store random data")
	}
	big := make([]byte, len(rnd))
	if n, err := in.inflate(big, zs.Bytes()); err != nil || n != len(rnd) || !bytes.Equal(big, rnd) {
		t.Fatalf("stored inflate: %d, %v", n, err)
	}
	bad = bytes.Clone(zs.Bytes())
	bad[len(bad)-10] ^= 1
	if _, err := in.inflate(big, bad); err == nil || !strings.Contains(err.Error(), "Adler-32") {
		t.Fatalf("stored, bad data: %v", err)
	}
	if _, err := in.inflate(big[:1000], zs.Bytes()); err == nil {
		t.Fatal("oversized stored stream accepted")
	}
	if _, err := in.inflate(out, []byte{1, 2, 3, 4, 5, 6}); err == nil {
		t.Fatal("bad header accepted")
	}
}

func TestAdler32(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := 0; n < 40000; n += 1 + n/5 {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		if got, want := adler32Sum(b), adler32.Checksum(b); got != want {
			t.Fatalf("random, n=%d: %#x, want %#x", n, got, want)
		}
		for i := range b {
			b[i] = 0xff // the largest sums
		}
		if got, want := adler32Sum(b), adler32.Checksum(b); got != want {
			t.Fatalf("0xff, n=%d: %#x, want %#x", n, got, want)
		}
	}
}

func BenchmarkAdler32(b *testing.B) {
	p := make([]byte, 64<<10)
	b.SetBytes(int64(len(p)))
	for range b.N {
		adler32Sum(p)
	}
}
