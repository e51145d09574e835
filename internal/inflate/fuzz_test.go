package inflate

import (
	"bytes"
	"testing"
)

// FuzzInflate compares Decode with compress/flate on arbitrary input: the
// same output and the same rest when compress/flate succeeds, an error
// when it fails, and ErrOutputFull for a buffer one byte short.
func FuzzInflate(f *testing.F) {
	for _, level := range []int{-2, 0, 1, 6, 9} {
		f.Add(deflate(f, mixedData(3000, 1), level))
		f.Add(deflate(f, textData(600, 2), level))
	}
	f.Add(deflate(f, nil, 6))
	f.Add([]byte{0x01, 1, 0, 0xfe, 0xff, 'x'})
	var w bitWriter
	dynamicHeader(&w, true, lengths(258, map[int]uint8{'a': 1, 256: 2, 257: 2}), lengths(1, map[int]uint8{0: 1}))
	f.Add(bytes.Clone(w.bytes()))
	var d Decoder
	scratch := make([]byte, compareLimit)
	f.Fuzz(func(t *testing.T, in []byte) {
		compare(t, &d, in, scratch)
	})
}
