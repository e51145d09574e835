package adler32

import "golang.org/x/sys/cpu"

// maxBlocks bounds one call of blocksAVX2 so no 32-bit lane overflows: a
// lane of the running byte sum gains at most 8·255 per block and the lane
// summing it gains at most 2040·n over n blocks, 2040·n²/2 in all, below
// 2^32 for n ≤ 2048 (64 KiB).
const maxBlocks = 2048

// blocksAVX2 sums n 32-byte blocks at p into three vectors of eight 32-bit
// lanes: out[0:8] the bytes, out[8:16] the byte sums before each block,
// out[16:24] the bytes weighted 32..1 by their place in the block.
//
//go:noescape
func blocksAVX2(p *byte, n int, out *[24]uint32)

// vector takes as many whole 32-byte blocks of p as it can and returns the
// sums and the rest of p.
func vector(s1, s2 uint32, p []byte) (uint32, uint32, []byte) {
	if !cpu.X86.HasAVX2 {
		return s1, s2, p
	}
	var out [24]uint32
	for len(p) >= 32 {
		n := min(len(p)/32, maxBlocks)
		blocksAVX2(&p[0], n, &out)
		var b1, bp, b2 uint64
		for i := range 8 {
			b1 += uint64(out[i])
			bp += uint64(out[8+i])
			b2 += uint64(out[16+i])
		}
		s1, s2 = combine(s1, s2, uint64(n), b1, bp, b2)
		p = p[n*32:]
	}
	return s1, s2, p
}
