package vmdk

import (
	"bytes"
	"compress/zlib"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/internal/inflate"
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
	// Incompressible data: stored blocks only, then with
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
	if zs.Len() < len(rnd) {
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

// The inflater's errors: a stream longer than the grain, a corrupt
// deflate stream (wrapped for errors.As), and a short grain reads as zeros
// past its end.
func TestInflateErrors(t *testing.T) {
	data := []byte(strings.Repeat("grain of text ", 500))
	var z bytes.Buffer
	w := zlib.NewWriter(&z)
	w.Write(data)
	w.Close()
	var in inflater
	out := make([]byte, len(data)-1)
	if _, err := in.inflate(out, z.Bytes()); err == nil || !strings.Contains(err.Error(), "inflates to more than") {
		t.Fatalf("oversized stream: %v", err)
	}
	bad := bytes.Clone(z.Bytes())
	bad[2] |= 6 // block type 3
	var ce *inflate.CorruptError
	if _, err := in.inflate(make([]byte, len(data)), bad); !errors.As(err, &ce) {
		t.Fatalf("block type 3: %v", err)
	}
	big := bytes.Repeat([]byte{0xff}, len(data)+100)
	if n, err := in.inflate(big, z.Bytes()); err != nil || n != len(data) || !bytes.Equal(big[:n], data) || !bytes.Equal(big[n:], make([]byte, 100)) {
		t.Fatalf("short grain: %d, %v", n, err)
	}
}
