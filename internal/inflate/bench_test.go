package inflate

import (
	"bytes"
	"compress/zlib"
	"io"
	"testing"

	kflate "github.com/klauspost/compress/flate"
)

// The benchmarks decode 64 KiB grains made by compress/zlib at the default
// level (as qemu-img's streamOptimized writer uses zlib), with our Decoder
// and with klauspost's flate reader reset over a bytes.Reader, as
// sources/vmdk used it. MB/s counts decompressed bytes.
func benchGrain(b *testing.B, gen func(int, uint64) []byte) (data, z []byte) {
	data = gen(64<<10, 11)
	var buf bytes.Buffer
	w := zlib.NewWriter(&buf)
	w.Write(data)
	w.Close()
	return data, buf.Bytes()[2:] // the deflate stream and the Adler-32
}

func benchKinds(b *testing.B, f func(b *testing.B, data, z []byte)) {
	for _, k := range []struct {
		name string
		gen  func(int, uint64) []byte
	}{{"random", randomData}, {"text", textData}, {"mixed", mixedData}, {"runs", runsData}} {
		b.Run(k.name, func(b *testing.B) {
			data, z := benchGrain(b, k.gen)
			b.SetBytes(int64(len(data)))
			b.ReportMetric(float64(len(z))/float64(len(data)), "ratio")
			f(b, data, z)
		})
	}
}

func BenchmarkOurs(b *testing.B) {
	benchKinds(b, func(b *testing.B, data, z []byte) {
		var d Decoder
		out := make([]byte, len(data))
		for b.Loop() {
			if n, _, err := d.Decode(out, z); err != nil || n != len(data) {
				b.Fatal(n, err)
			}
		}
	})
}

func BenchmarkKlauspost(b *testing.B) {
	benchKinds(b, func(b *testing.B, data, z []byte) {
		var br bytes.Reader
		br.Reset(z)
		fr := kflate.NewReader(&br)
		out := make([]byte, len(data))
		for b.Loop() {
			br.Reset(z)
			if err := fr.(kflate.Resetter).Reset(&br, nil); err != nil {
				b.Fatal(err)
			}
			if n, err := io.ReadFull(fr, out); err != nil || n != len(data) {
				b.Fatal(n, err)
			}
		}
	})
}
