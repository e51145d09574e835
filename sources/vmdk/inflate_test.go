package vmdk

import (
	"bytes"
	"compress/zlib"
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
	if _, err := in.inflate(out, []byte{1, 2, 3, 4, 5, 6}); err == nil {
		t.Fatal("bad header accepted")
	}
}
