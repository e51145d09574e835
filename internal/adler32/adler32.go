// Package adler32 computes RFC 1950's Adler-32 checksum, the trailer of every
// zlib stream (the compressed grains of a streamOptimized VMDK). It is the
// same sum as hash/adler32, faster: on amd64 with AVX2 it takes 32 bytes per
// step in vector registers, elsewhere 16 bytes per step in 64-bit words.
// Verifying the trailer was a tenth of the CPU time of reading a
// streamOptimized disk with the one-byte-per-step hash/adler32.
package adler32

import "encoding/binary"

const (
	mod  = 65521 // the largest prime below 2^16
	nmax = 5552  // the most bytes the 32-bit sums take before a modulo
)

// Checksum returns the Adler-32 checksum of p.
func Checksum(p []byte) uint32 {
	s1, s2 := uint32(1), uint32(0)
	s1, s2, p = vector(s1, s2, p)
	return words(s1, s2, p)
}

// combine adds a run of n 32-byte blocks to the sums (s1, s2), given the
// run's byte sum b1, the sum bp of the byte sums of the blocks before each
// block, and the sum b2 of each byte weighted by 32 minus its place in its
// block: each block adds 32·s1 + its weighted sum to s2, and its byte sum
// to s1.
func combine(s1, s2 uint32, n, b1, bp, b2 uint64) (uint32, uint32) {
	t2 := uint64(s2) + n*32*uint64(s1) + 32*bp + b2
	return uint32((uint64(s1) + b1) % mod), uint32(t2 % mod)
}

// words is the portable sum, 16 bytes per step. For a word of bytes
// b0..b7: s2 += 8·s1 + Σ(8-j)·bj and s1 += Σbj, the same sums as byte by
// byte, so the classic 5552-byte bound keeps them within 32 bits. The byte
// sums come from 16-bit lanes (even and odd bytes) and one multiplication
// each: the top lane of lanes×constant is the weighted sum of the lanes,
// and no lane overflows (at most 255·20 = 5100 before the final add).
func words(s1, s2 uint32, p []byte) uint32 {
	const (
		lanes = 0x00ff00ff00ff00ff
		ones  = 0x0001000100010001
		wEven = 2 | 4<<16 | 6<<32 | 8<<48 // weights 8,6,4,2 of b0,b2,b4,b6
		wOdd  = 1 | 3<<16 | 5<<32 | 7<<48 // weights 7,5,3,1 of b1,b3,b5,b7
	)
	for len(p) > 0 {
		q := p[:min(len(p), nmax)]
		p = p[len(q):]
		for len(q) >= 16 {
			a := binary.LittleEndian.Uint64(q)
			b := binary.LittleEndian.Uint64(q[8:])
			ae, ao := a&lanes, (a>>8)&lanes
			be, bo := b&lanes, (b>>8)&lanes
			sa := uint32(((ae + ao) * ones) >> 48)
			sb := uint32(((be + bo) * ones) >> 48)
			wa := uint32((ae*wEven + ao*wOdd) >> 48)
			wb := uint32((be*wEven + bo*wOdd) >> 48)
			s2 += 16*s1 + 8*sa + wa + wb
			s1 += sa + sb
			q = q[16:]
		}
		for _, x := range q {
			s1 += uint32(x)
			s2 += s1
		}
		s1 %= mod
		s2 %= mod
	}
	return s2<<16 | s1
}
