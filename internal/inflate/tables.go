package inflate

import (
	"errors"
	"math/bits"
	"slices"
)

const (
	maxLit  = 288 // literal/length symbols of the fixed code; dynamic blocks use ≤ 286
	maxDist = 32  // distance symbols of the fixed code; dynamic blocks use ≤ 30
	maxLen  = 15  // longest code

	litBits  = 11 // primary table index bits
	distBits = 8
	preBits  = 7 // code-length codes are at most 7 bits: no sub-tables

	// Table sizes: the primary table plus room for sub-tables. A sub-table
	// serves at least two codes of a complete code, so there are at most
	// symbols/2 of them, each of at most 2^(maxLen-bits) entries.
	litTableSize  = 1<<litBits + (286/2)*(1<<(maxLen-litBits))
	distTableSize = 1<<distBits + (30/2)*(1<<(maxLen-distBits))
)

// A table entry is a uint32:
//
//	bits 0-7   bits to consume for the code (for a sub-table pointer: the
//	           primary table's index bits)
//	bits 8-11  extra bits that follow a length or distance code (for a
//	           sub-table pointer: the sub-table's index bits)
//	bits 12-15 flags
//	bits 16-31 the value: literal byte, length or distance base, code-length
//	           symbol, or sub-table start
const (
	lenMask  = 0xff
	fInvalid = 1 << 12 // no code maps here (incomplete code) or a reserved symbol
	fSub     = 1 << 13 // pointer to a sub-table
	fEOB     = 1 << 14 // end of block
	fLiteral = 1 << 15 // literal byte
	fRare    = fInvalid | fSub | fEOB
)

type kind uint8

const (
	kindLit kind = iota
	kindDist
	kindPre
)

// lengthBase and lengthExtra describe length symbols 257..285, distBase
// and distExtra distance symbols 0..29 (RFC 1951 3.2.5).
var lengthBase, lengthExtra, distBase, distExtra = baseTables()

func baseTables() (lb [29]uint16, le [29]uint8, db [30]uint16, de [30]uint8) {
	b := uint16(3)
	for i := range 28 {
		if i >= 8 {
			le[i] = uint8(i/4 - 1)
		}
		lb[i] = b
		b += 1 << le[i]
	}
	lb[28] = 258
	b = 1
	for i := range 30 {
		if i >= 4 {
			de[i] = uint8(i/2 - 1)
		}
		db[i] = b
		b += 1 << de[i]
	}
	return
}

// entry is the table entry of symbol sym whose code takes l bits (after
// the primary index bits, in a sub-table).
func entry(k kind, sym int, l uint) uint32 {
	e := uint32(l)
	switch k {
	case kindPre:
		return e | uint32(sym)<<16
	case kindDist:
		if sym >= 30 {
			return e | fInvalid
		}
		return e | uint32(distExtra[sym])<<8 | uint32(distBase[sym])<<16
	}
	switch {
	case sym < 256:
		return e | fLiteral | uint32(sym)<<16
	case sym == 256:
		return e | fEOB
	case sym < 286:
		return e | uint32(lengthExtra[sym-257])<<8 | uint32(lengthBase[sym-257])<<16
	}
	return e | fInvalid
}

var (
	errOversubscribed = errors.New("code lengths are over-subscribed")
	errIncomplete     = errors.New("code lengths are incomplete")
	errTableSize      = errors.New("sub-tables overflow the table")
)

// build fills table (primary index of tb bits, then sub-tables) with the
// canonical Huffman code of the code lengths lens (RFC 1951 3.2.2). Codes
// must be complete, except for the two degenerate codes zlib and Go's
// compress/flate accept: no codes at all, and a single code of one bit.
// Entries no code reaches are invalid.
func build(table []uint32, tb uint, lens []uint8, k kind) error {
	var count [maxLen + 1]int
	for _, l := range lens {
		count[l]++
	}
	count[0] = 0
	left := 1
	maxl := 0
	for l := 1; l <= maxLen; l++ {
		left <<= 1
		left -= count[l]
		if left < 0 {
			return errOversubscribed
		}
		if count[l] > 0 {
			maxl = l
		}
	}
	primary := table[:1<<tb]
	if left > 0 {
		total := 0
		for _, c := range count {
			total += c
		}
		if total > 1 || (total == 1 && count[1] != 1) {
			return errIncomplete
		}
		for i := range primary {
			primary[i] = fInvalid
		}
		if total == 1 {
			// The one code of one bit: 0.
			for i := 0; i < len(primary); i += 2 {
				primary[i] = entry(k, slices.Index(lens, 1), 1)
			}
		}
		return nil
	}
	// Symbols sorted by code length, then by value: canonical order.
	var offs [maxLen + 2]int
	for l := 1; l <= maxLen; l++ {
		offs[l+1] = offs[l] + count[l]
	}
	var sorted [maxLit]uint16
	for sym, l := range lens {
		if l != 0 {
			sorted[offs[l]] = uint16(sym)
			offs[l]++
		}
	}
	ncodes := offs[maxl]
	codes := sorted[:ncodes]

	code := 0  // canonical code of the current symbol, MSB first
	l := 1     // its length
	inLen := 0 // codes of length l already assigned
	next := 1 << tb
	curPrefix := -1
	var subStart, subBits int
	remaining := count // codes of each length not yet placed
	filled := uint(0)  // log2 of the primary entries made so far
	for _, sym := range codes {
		for inLen == count[l] {
			code <<= 1
			l++
			inLen = 0
		}
		rev := int(bits.Reverse16(uint16(code)) >> (16 - l))
		if uint(l) <= tb {
			// The primary table is built by doubling: its first 2^l
			// entries are right for codes of up to l bits (the rest are
			// prefixes of longer codes, filled at their length), and
			// their copy is right for l+1 bits.
			for filled < uint(l) {
				copy(primary[1<<filled:2<<filled], primary[:1<<filled])
				filled++
			}
			primary[rev] = entry(k, int(sym), uint(l))
		} else {
			for filled < tb {
				copy(primary[1<<filled:2<<filled], primary[:1<<filled])
				filled++
			}
			prefix := rev & (1<<tb - 1)
			if prefix != curPrefix {
				// A new sub-table: size it to the longest code under this
				// prefix. Codes fill the prefix's subtree in canonical
				// order; it is full at the depth where the codes left of
				// each length no longer fit the free slots.
				curPrefix = prefix
				subBits = l - int(tb)
				free := 1 << subBits
				for subBits+int(tb) < maxl {
					free -= remaining[subBits+int(tb)]
					if free <= 0 {
						break
					}
					subBits++
					free <<= 1
				}
				subStart = next
				next += 1 << subBits
				if next > len(table) {
					return errTableSize
				}
				primary[prefix] = fSub | uint32(subStart)<<16 | uint32(subBits)<<8 | uint32(tb)
			}
			sl := l - int(tb)
			e := entry(k, int(sym), uint(sl))
			for i := rev >> tb; i < 1<<subBits; i += 1 << sl {
				table[subStart+i] = e
			}
		}
		remaining[l]--
		code++
		inLen++
	}
	for filled < tb {
		copy(primary[1<<filled:2<<filled], primary[:1<<filled])
		filled++
	}
	return nil
}
