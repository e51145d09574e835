package inflate

import (
	"bytes"
	"compress/flate"
	"compress/zlib"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"

	kflate "github.com/klauspost/compress/flate"
)

// Test data shaped like internal/diskgen's disks.

func randomData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// textData is diskgen's text: words of a small vocabulary, some sentences.
func textData(n int, seed uint64) []byte {
	words := strings.Fields("the quick brown fox jumps over lazy dog virtual machine disk sector grain " +
		"kernel initramfs datastore snapshot extent cluster migration vmware kvm qemu block " +
		"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor")
	r := rand.New(rand.NewPCG(seed, 1))
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(12) == 0 {
			b.WriteString(".\n")
		} else {
			b.WriteByte(' ')
		}
	}
	return b.Bytes()[:n]
}

// runsData has runs of one byte and of short periods (distances 1 to 9),
// between bits of random data.
func runsData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 3))
	p := make([]byte, 0, n)
	for len(p) < n {
		period := 1 + r.IntN(9)
		pat := make([]byte, period)
		for i := range pat {
			pat[i] = byte(r.Uint32())
		}
		for k := r.IntN(600); k > 0; k-- {
			p = append(p, pat[k%period])
		}
		for k := r.IntN(20); k > 0; k-- {
			p = append(p, byte(r.Uint32()))
		}
	}
	return p[:n]
}

// mixedData interleaves 4 KiB pieces of text, random bytes, zeros and runs.
func mixedData(n int, seed uint64) []byte {
	p := make([]byte, 0, n+4096)
	for i := 0; len(p) < n; i++ {
		s := seed + uint64(i)
		switch i % 4 {
		case 0:
			p = append(p, textData(4096, s)...)
		case 1:
			p = append(p, randomData(4096, s)...)
		case 2:
			p = append(p, make([]byte, 4096)...)
		default:
			p = append(p, runsData(4096, s)...)
		}
	}
	return p[:n]
}

func deflate(t testing.TB, data []byte, level int) []byte {
	var z bytes.Buffer
	w, err := flate.NewWriter(&z, level)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(data)
	w.Close()
	return z.Bytes()
}

// check decodes stream (followed by a trailer) into a buffer of exactly
// len(want) bytes with guard bytes after it, and checks the output, the
// rest, that nothing was written past the buffer, and that one byte less
// of buffer fails with ErrOutputFull.
func check(t *testing.T, d *Decoder, name string, stream, want []byte) {
	t.Helper()
	trailer := []byte{0xde, 0xad, 0xbe, 0xef, 0x01}
	in := append(append([]byte{}, stream...), trailer...)
	mem := bytes.Repeat([]byte{0xa5}, len(want)+16)
	out := mem[:len(want)]
	n, rest, err := d.Decode(out, in)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if n != len(want) || !bytes.Equal(out, want) {
		t.Fatalf("%s: decoded %d bytes, want %d, equal %v", name, n, len(want), bytes.Equal(out[:min(n, len(out))], want[:min(n, len(want))]))
	}
	if !bytes.Equal(rest, trailer) {
		t.Fatalf("%s: rest is %x, want %x", name, rest, trailer)
	}
	if bytes.Count(mem[len(want):], []byte{0xa5}) != 16 {
		t.Fatalf("%s: wrote past the output buffer", name)
	}
	if len(want) > 0 {
		if _, _, err := d.Decode(out[:len(want)-1], in); !errors.Is(err, ErrOutputFull) {
			t.Fatalf("%s: one byte short of buffer: %v", name, err)
		}
	}
}

var sizes = []int{0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 255, 256, 257, 258, 259, 265, 266, 267, 300,
	1000, 4095, 4096, 4097, 16383, 16384, 16385, 32767, 32768, 32769, 65535, 65536, 65537, 200000}

func TestRoundTripFlate(t *testing.T) {
	var d Decoder
	kinds := []struct {
		name string
		gen  func(int, uint64) []byte
	}{{"random", randomData}, {"text", textData}, {"runs", runsData}, {"mixed", mixedData}}
	for _, k := range kinds {
		for _, size := range sizes {
			data := k.gen(size, uint64(size))
			for level := -2; level <= 9; level++ {
				if size > 70000 && level > 1 && level < 9 {
					continue // keep the run short: the big size at a few levels
				}
				check(t, &d, fmt.Sprintf("%s/%d/level %d", k.name, size, level), deflate(t, data, level), data)
			}
		}
	}
}

// klauspost's encoder makes other block shapes than compress/flate's.
func TestRoundTripKlauspost(t *testing.T) {
	var d Decoder
	for _, size := range []int{0, 1, 100, 5000, 65536, 100000} {
		data := mixedData(size, 9)
		for level := -2; level <= 9; level++ {
			var z bytes.Buffer
			w, err := kflate.NewWriter(&z, level)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(data)
			w.Close()
			check(t, &d, fmt.Sprintf("klauspost %d/level %d", size, level), z.Bytes(), data)
		}
	}
}

// zlib streams, as qemu-img writes grains: the rest is the Adler-32.
func TestZlib(t *testing.T) {
	var d Decoder
	for _, gen := range []func(int, uint64) []byte{textData, randomData, mixedData} {
		data := gen(65536, 5)
		for _, level := range []int{zlib.BestSpeed, zlib.DefaultCompression, zlib.BestCompression} {
			var z bytes.Buffer
			w, _ := zlib.NewWriterLevel(&z, level)
			w.Write(data)
			w.Close()
			out := make([]byte, 65536)
			n, rest, err := d.Decode(out, z.Bytes()[2:])
			if err != nil || n != len(data) || !bytes.Equal(out, data) || len(rest) != 4 {
				t.Fatalf("level %d: %d bytes, %d left, %v", level, n, len(rest), err)
			}
		}
	}
}

// Truncated streams fail (no panic); so do streams with their bytes
// changed unless compress/flate decodes them the same way.
func TestDamaged(t *testing.T) {
	var d Decoder
	data := mixedData(20000, 4)
	scratch := make([]byte, compareLimit)
	for _, level := range []int{-2, 0, 1, 6, 9} {
		z := deflate(t, data, level)
		out := make([]byte, len(data))
		for k := range len(z) {
			if k > 300 && k%37 != 0 && k < len(z)-300 {
				continue
			}
			if _, _, err := d.Decode(out, z[:k]); err == nil {
				t.Fatalf("level %d: stream cut at %d of %d bytes decoded", level, k, len(z))
			}
		}
		r := rand.New(rand.NewPCG(uint64(level+3), 9))
		for range 300 {
			bad := bytes.Clone(z)
			for range 1 + r.IntN(3) {
				bad[r.IntN(len(bad))] ^= byte(1 + r.IntN(255))
			}
			compare(t, &d, bad, scratch)
		}
	}
}

// compareLimit bounds the output compare checks.
const compareLimit = 256 << 10

// compare checks Decode against compress/flate on arbitrary input; out is
// scratch space of compareLimit bytes.
func compare(t *testing.T, d *Decoder, in, out []byte) {
	t.Helper()
	br := bytes.NewReader(in)
	want, werr := io.ReadAll(io.LimitReader(flate.NewReader(br), compareLimit+1))
	if len(want) > compareLimit {
		return
	}
	if werr != nil {
		if n, _, err := d.Decode(out[:compareLimit], in); err == nil {
			t.Fatalf("input %x: decoded %d bytes, compress/flate fails: %v", in, n, werr)
		}
		return
	}
	out = out[:len(want)]
	n, rest, err := d.Decode(out, in)
	if err != nil {
		t.Fatalf("input %x: %v; compress/flate decodes %d bytes", in, err, len(want))
	}
	if n != len(want) || !bytes.Equal(out, want) {
		t.Fatalf("input %x: decoded %d bytes unlike compress/flate's %d", in, n, len(want))
	}
	if len(rest) != br.Len() {
		t.Fatalf("input %x: %d bytes left, compress/flate leaves %d", in, len(rest), br.Len())
	}
	if len(want) > 0 {
		if _, _, err := d.Decode(out[:len(want)-1], in); !errors.Is(err, ErrOutputFull) {
			t.Fatalf("input %x: one byte short of buffer: %v", in, err)
		}
	}
}

// bitWriter writes deflate bit streams for hand-made blocks.
type bitWriter struct {
	out  []byte
	acc  uint64
	nacc uint
}

func (w *bitWriter) bits(v uint64, n uint) {
	w.acc |= v << w.nacc
	w.nacc += n
	for w.nacc >= 8 {
		w.out = append(w.out, byte(w.acc))
		w.acc >>= 8
		w.nacc -= 8
	}
}

// code writes a Huffman code, most significant bit first.
func (w *bitWriter) code(c uint32, n uint) {
	for i := int(n) - 1; i >= 0; i-- {
		w.bits(uint64(c>>uint(i))&1, 1)
	}
}

func (w *bitWriter) bytes() []byte {
	if w.nacc > 0 {
		w.bits(0, 8-w.nacc)
	}
	return w.out
}

// canonical returns the canonical codes of lens.
func canonical(lens []uint8) []uint32 {
	var count [16]uint32
	for _, l := range lens {
		count[l]++
	}
	count[0] = 0
	var next [16]uint32
	c := uint32(0)
	for l := 1; l < 16; l++ {
		c = (c + count[l-1]) << 1
		next[l] = c
	}
	codes := make([]uint32, len(lens))
	for s, l := range lens {
		if l != 0 {
			codes[s] = next[l]
			next[l]++
		}
	}
	return codes
}

// dynamicHeader writes a dynamic block header for the given code lengths,
// with a code-length code of sixteen 4-bit codes (lengths only, no
// repeats).
func dynamicHeader(w *bitWriter, final bool, lit, dist []uint8) {
	f := uint64(0)
	if final {
		f = 1
	}
	w.bits(f|2<<1, 3)
	w.bits(uint64(len(lit)-257), 5)
	w.bits(uint64(len(dist)-1), 5)
	w.bits(19-4, 4)
	for _, s := range precodeOrder {
		if s < 16 {
			w.bits(4, 3)
		} else {
			w.bits(0, 3)
		}
	}
	for _, l := range append(append([]uint8{}, lit...), dist...) {
		w.code(uint32(l), 4) // symbol l has canonical code l
	}
}

type sym struct {
	s     int // literal/length symbol
	extra uint64
	d     int // distance symbol, when s > 256
	dx    uint64
}

func encode(w *bitWriter, lit, dist []uint8, syms []sym) {
	lc, dc := canonical(lit), canonical(dist)
	for _, s := range syms {
		w.code(lc[s.s], uint(lit[s.s]))
		if s.s > 256 {
			w.bits(s.extra, uint(lengthExtra[s.s-257]))
			w.code(dc[s.d], uint(dist[s.d]))
			w.bits(s.dx, uint(distExtra[s.d]))
		}
	}
}

func lengths(n int, set map[int]uint8) []uint8 {
	l := make([]uint8, n)
	for s, v := range set {
		l[s] = v
	}
	return l
}

// Long codes: literal/length and distance codes of 1 to 15 bits, so the
// sub-tables of both are used, from the fast and the slow loop.
func TestLongCodes(t *testing.T) {
	var d Decoder
	litSyms := []int{'a', 256, 'b', 257, 'c', 265, 'd', 270, 'e', 280, 'f', 284, 'g', 285, 'h', 'i'}
	ls := map[int]uint8{}
	for i, s := range litSyms {
		ls[s] = uint8(min(i+1, 15))
	}
	lit := lengths(286, ls)
	ds := map[int]uint8{}
	for i := range 16 {
		ds[i] = uint8(min(i+1, 15))
	}
	dist := lengths(30, ds)
	r := rand.New(rand.NewPCG(1, 1))
	for _, n := range []int{10, 100, 3000} {
		var syms []sym
		out := 0
		for len(syms) < n {
			s := litSyms[r.IntN(len(litSyms))]
			switch {
			case s == 256:
				continue
			case s < 256:
				syms = append(syms, sym{s: s})
				out++
			default:
				dsym := r.IntN(16)
				dx := uint64(r.IntN(1 << distExtra[dsym]))
				if int(distBase[dsym])+int(dx) > out {
					continue
				}
				x := uint64(r.IntN(1 << lengthExtra[s-257]))
				syms = append(syms, sym{s: s, extra: x, d: dsym, dx: dx})
				out += int(lengthBase[s-257]) + int(x)
			}
		}
		syms = append(syms, sym{s: 256})
		var w bitWriter
		dynamicHeader(&w, true, lit, dist)
		encode(&w, lit, dist, syms)
		stream := w.bytes()
		want, err := io.ReadAll(flate.NewReader(bytes.NewReader(stream)))
		if err != nil || len(want) != out {
			t.Fatalf("test setup: compress/flate: %d bytes, want %d, %v", len(want), out, err)
		}
		check(t, &d, fmt.Sprintf("%d symbols", n), stream, want)
	}
}

func corrupt(t *testing.T, d *Decoder, name string, in []byte, outLen int, want string) {
	t.Helper()
	_, _, err := d.Decode(make([]byte, outLen), in)
	var ce *CorruptError
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), want) {
		t.Errorf("%s: %v, want a corrupt-stream error saying %q", name, err, want)
	}
	if _, werr := io.ReadAll(flate.NewReader(bytes.NewReader(in))); werr == nil {
		t.Errorf("%s: compress/flate accepts it", name)
	}
}

func TestMalformed(t *testing.T) {
	var d Decoder
	if _, _, err := d.Decode(make([]byte, 10), nil); !errors.Is(err, ErrTruncated) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("empty input: %v", err)
	}
	corrupt(t, &d, "block type 3", []byte{0x07, 0, 0, 0}, 10, "block type 3")
	corrupt(t, &d, "stored LEN/NLEN", []byte{0x01, 5, 0, 0xfa, 0xfe, 1, 2, 3, 4, 5}, 10, "NLEN")
	if _, _, err := d.Decode(make([]byte, 10), []byte{0x01, 5, 0, 0xfa, 0xff, 1, 2}); !errors.Is(err, ErrTruncated) {
		t.Errorf("stored block cut short: %v", err)
	}
	if _, _, err := d.Decode(make([]byte, 10), []byte{0x00, 1, 0, 0xfe, 0xff, 1}); !errors.Is(err, ErrTruncated) {
		t.Errorf("no final block: %v", err)
	}

	// Fixed code: literal/length symbol s, written with the fixed code.
	fixedLit := func(w *bitWriter, s int) {
		switch {
		case s < 144:
			w.code(uint32(0x30+s), 8)
		case s < 256:
			w.code(uint32(0x190+s-144), 9)
		case s < 280:
			w.code(uint32(s-256), 7)
		default:
			w.code(uint32(0xc0+s-280), 8)
		}
	}
	fixed := func(f func(w *bitWriter)) []byte {
		var w bitWriter
		w.bits(1|1<<1, 3)
		f(&w)
		fixedLit(&w, 256)
		return append(w.bytes(), make([]byte, 20)...)
	}
	corrupt(t, &d, "distance before the start", fixed(func(w *bitWriter) {
		fixedLit(w, 'x')
		fixedLit(w, 257)
		w.code(1, 5) // distance 2
	}), 10, "distance 2 reaches before")
	corrupt(t, &d, "fixed symbol 286", fixed(func(w *bitWriter) { fixedLit(w, 286) }), 10, "invalid literal/length")
	corrupt(t, &d, "fixed distance 30", fixed(func(w *bitWriter) {
		fixedLit(w, 'x')
		fixedLit(w, 257)
		w.code(30, 5)
	}), 10, "invalid distance")
	// The same in a long stream (the fast loop).
	long := func(f func(w *bitWriter)) []byte {
		var w bitWriter
		w.bits(1|1<<1, 3)
		for range 1000 {
			fixedLit(&w, 'y')
		}
		f(&w)
		fixedLit(&w, 256)
		return append(w.bytes(), make([]byte, 20)...)
	}
	corrupt(t, &d, "fast: distance before the start", long(func(w *bitWriter) {
		fixedLit(w, 265)
		w.bits(0, 1)
		w.code(29, 5)
		w.bits(0, 13) // distance 24577
	}), 5000, "distance 24577 reaches before")
	corrupt(t, &d, "fast: fixed symbol 287", long(func(w *bitWriter) { fixedLit(w, 287) }), 5000, "invalid literal/length")
	corrupt(t, &d, "fast: fixed distance 31", long(func(w *bitWriter) {
		fixedLit(w, 257)
		w.code(31, 5)
	}), 5000, "invalid distance")
	if _, _, err := d.Decode(make([]byte, 500), long(func(*bitWriter) {})); !errors.Is(err, ErrOutputFull) {
		t.Errorf("fixed block longer than the buffer: %v", err)
	}

	dyn := func(lit, dist []uint8, syms []sym) []byte {
		var w bitWriter
		dynamicHeader(&w, true, lit, dist)
		encode(&w, lit, dist, syms)
		return w.bytes()
	}
	okLit := lengths(258, map[int]uint8{'a': 1, 256: 2, 257: 2})
	// One distance code of one bit (allowed), used; then its missing
	// other half.
	oneDist := lengths(1, map[int]uint8{0: 1})
	check(t, &d, "one distance code", dyn(okLit, oneDist, []sym{{s: 'a'}, {s: 257, d: 0}, {s: 256}}), []byte("aaaa"))
	corrupt(t, &d, "missing half of a one-code distance code", func() []byte {
		var w bitWriter
		dynamicHeader(&w, true, okLit, oneDist)
		encode(&w, okLit, oneDist, []sym{{s: 'a'}})
		w.code(canonical(okLit)[257], 2)
		w.code(1, 1)
		w.code(canonical(okLit)[256], 2)
		return append(w.bytes(), 0, 0, 0, 0)
	}(), 10, "invalid distance")
	// No distance codes at all (one code of zero bits): literals only.
	noDist := lengths(1, nil)
	check(t, &d, "no distance codes", dyn(okLit, noDist, []sym{{s: 'a'}, {s: 'a'}, {s: 256}}), []byte("aa"))
	corrupt(t, &d, "match with no distance codes", append(dyn(okLit, noDist, []sym{{s: 'a'}, {s: 257}}), 0, 0, 0), 10, "invalid distance")

	corrupt(t, &d, "over-subscribed literal/length code",
		dyn(lengths(258, map[int]uint8{'a': 1, 256: 1, 257: 1}), oneDist, nil), 10, "over-subscribed")
	corrupt(t, &d, "incomplete literal/length code",
		dyn(lengths(257, map[int]uint8{'a': 2, 256: 2}), oneDist, nil), 10, "incomplete")
	corrupt(t, &d, "incomplete distance code",
		dyn(okLit, lengths(3, map[int]uint8{0: 2, 1: 2}), nil), 10, "distance code: code lengths are incomplete")
	corrupt(t, &d, "no end-of-block code",
		dyn(lengths(258, map[int]uint8{'a': 1, 257: 1}), oneDist, nil), 10, "no end-of-block")

	// Header fields.
	hdr := func(f func(w *bitWriter)) []byte {
		var w bitWriter
		w.bits(1|2<<1, 3)
		f(&w)
		return append(w.bytes(), make([]byte, 40)...)
	}
	corrupt(t, &d, "HLIT 287", hdr(func(w *bitWriter) { w.bits(30, 5); w.bits(0, 5); w.bits(0, 4) }), 10, "HLIT")
	corrupt(t, &d, "HDIST 31", hdr(func(w *bitWriter) { w.bits(0, 5); w.bits(30, 5); w.bits(0, 4) }), 10, "HDIST")
	corrupt(t, &d, "over-subscribed code-length code", hdr(func(w *bitWriter) {
		w.bits(0, 5)
		w.bits(0, 5)
		w.bits(15, 4)
		for range 19 {
			w.bits(1, 3)
		}
	}), 10, "code-length code: code lengths are over-subscribed")
	corrupt(t, &d, "repeat with no previous length", hdr(func(w *bitWriter) {
		w.bits(0, 5)
		w.bits(0, 5)
		w.bits(0, 4) // 4 lengths: symbols 16, 17, 18, 0
		w.bits(1, 3) // 16: code 0
		w.bits(0, 3)
		w.bits(0, 3)
		w.bits(1, 3) // 0: code 0, 16: code 1
		w.code(1, 1)
		w.bits(0, 2)
	}), 10, "no previous length")
	corrupt(t, &d, "repeat past the lengths", hdr(func(w *bitWriter) {
		w.bits(0, 5)
		w.bits(0, 5)
		w.bits(0, 4) // symbols 16, 17, 18, 0
		w.bits(0, 3)
		w.bits(0, 3)
		w.bits(1, 3) // 18
		w.bits(1, 3) // 0: code 0, 18: code 1
		for range 3 {
			w.code(1, 1)
			w.bits(127, 7) // 138 zeros, three times: past 258
		}
	}), 10, "runs past")
}

// A Decoder moves between fixed, dynamic and stored blocks and streams.
func TestReuse(t *testing.T) {
	var d Decoder
	r := rand.New(rand.NewPCG(7, 7))
	for i := range 200 {
		data := mixedData(r.IntN(70000), uint64(i))
		level := r.IntN(12) - 2
		check(t, &d, fmt.Sprintf("stream %d level %d", i, level), deflate(t, data, level), data)
	}
}

func TestAllocs(t *testing.T) {
	var d Decoder
	data := mixedData(65536, 3)
	z := deflate(t, data, 6)
	out := make([]byte, len(data))
	if a := testing.AllocsPerRun(20, func() {
		if _, _, err := d.Decode(out, z); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Errorf("%v allocations per Decode", a)
	}
}
