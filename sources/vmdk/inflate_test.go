package vmdk

import (
	"bytes"
	"compress/zlib"
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
