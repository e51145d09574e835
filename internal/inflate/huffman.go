package inflate

import "encoding/binary"

// Bounds of the fast loop. While at least inSlack input bytes are left it
// refills the bit buffer with whole words (two refills per iteration, at
// most 7 bytes each); while at least outSlack bytes of output are left it
// writes without checking (a 258-byte match plus up to two words of
// overshoot).
const (
	inSlack  = 16
	outSlack = 258 + 16
)

// huffman decodes the symbols of one Huffman-coded block with d.lit and
// d.dist into out from op, and returns the new output length.
func (d *Decoder) huffman(out []byte, op int, b *bitReader) (int, error) {
	in := b.in
	pos, buf, n := b.pos, b.buf, b.n
	lit, dist := &d.lit, &d.dist

	// Fast loop: a refill leaves at least 56 bits, enough for a whole
	// match (15+5 bits of length, 15+13 of distance) or three literals.
	for pos <= len(in)-inSlack && op <= len(out)-outSlack {
		buf |= binary.LittleEndian.Uint64(in[pos:]) << (n & 63)
		pos += int(63-n) >> 3
		n |= 56

		e := lit[buf&(1<<litBits-1)]
		if e&fLiteral != 0 {
			buf >>= e & 63
			n -= uint(e & lenMask)
			out[op] = byte(e >> 16)
			op++
			e = lit[buf&(1<<litBits-1)]
			if e&fLiteral != 0 {
				buf >>= e & 63
				n -= uint(e & lenMask)
				out[op] = byte(e >> 16)
				op++
				e = lit[buf&(1<<litBits-1)]
				if e&fLiteral != 0 {
					buf >>= e & 63
					n -= uint(e & lenMask)
					out[op] = byte(e >> 16)
					op++
					continue
				}
			}
			// Not a literal: top up for the match (the low bits, and so
			// e, stay as they are).
			buf |= binary.LittleEndian.Uint64(in[pos:]) << (n & 63)
			pos += int(63-n) >> 3
			n |= 56
		}
		if e&fRare != 0 {
			if e&fSub != 0 {
				buf >>= litBits
				n -= litBits
				e = lit[int(e>>16)+int(buf&(1<<((e>>8)&15)-1))]
				if e&fLiteral != 0 {
					buf >>= e & 63
					n -= uint(e & lenMask)
					out[op] = byte(e >> 16)
					op++
					continue
				}
			}
			if e&fEOB != 0 {
				buf >>= e & 63
				n -= uint(e & lenMask)
				b.pos, b.buf, b.n = pos, buf, n
				return op, nil
			}
			if e&fInvalid != 0 {
				b.pos, b.buf, b.n = pos, buf, n
				return op, b.corrupt("invalid literal/length code")
			}
		}
		// Length: base plus extra bits.
		buf >>= e & 63
		n -= uint(e & lenMask)
		x := (e >> 8) & 15
		length := int(e>>16) + int(buf&(1<<x-1))
		buf >>= x
		n -= uint(x)

		e = dist[buf&(1<<distBits-1)]
		if e&fRare != 0 {
			if e&fSub != 0 {
				buf >>= distBits
				n -= distBits
				e = dist[int(e>>16)+int(buf&(1<<((e>>8)&15)-1))]
			}
			if e&fInvalid != 0 {
				b.pos, b.buf, b.n = pos, buf, n
				return op, b.corrupt("invalid distance code")
			}
		}
		buf >>= e & 63
		n -= uint(e & lenMask)
		x = (e >> 8) & 15
		dd := int(e>>16) + int(buf&(1<<x-1))
		buf >>= x
		n -= uint(x)
		if dd > op {
			b.pos, b.buf, b.n = pos, buf, n
			return op, b.corrupt("distance %d reaches before the start of the output (%d bytes)", dd, op)
		}

		// Copy the match. Word copies may write up to 15 bytes past its
		// end, which outSlack leaves room for; later output overwrites
		// them.
		src, end := op-dd, op+length
		if dd >= 8 {
			// A word read from dd ≥ 8 bytes back is all written: copy
			// two words unconditionally (most matches are short), then
			// loop.
			binary.LittleEndian.PutUint64(out[op:], binary.LittleEndian.Uint64(out[src:]))
			binary.LittleEndian.PutUint64(out[op+8:], binary.LittleEndian.Uint64(out[src+8:]))
			for op, src = op+16, src+16; op < end; op, src = op+8, src+8 {
				binary.LittleEndian.PutUint64(out[op:], binary.LittleEndian.Uint64(out[src:]))
			}
		} else {
			// A repeating pattern of period dd: make its first word
			// byte by byte, then store that word every multiple of dd.
			o := out[op : op+8]
			_ = out[src+7]
			for i := range o {
				o[i] = out[src+i]
			}
			v := binary.LittleEndian.Uint64(o)
			step := 8 - 8%dd
			for op += step; op < end; op += step {
				binary.LittleEndian.PutUint64(out[op:], v)
			}
		}
		op = end
	}

	// Slow loop near the end of the input or output: byte refills (with
	// zeros past the end of the input, caught by overrun) and checked
	// writes.
	for {
		if n < 56 {
			for n < 56 {
				if pos < len(in) {
					buf |= uint64(in[pos]) << (n & 63)
				}
				pos++
				n += 8
			}
			if pos*8-int(n) > len(in)*8 {
				b.pos, b.buf, b.n = pos, buf, n
				return op, ErrTruncated
			}
		}
		e := lit[buf&(1<<litBits-1)]
		if e&fSub != 0 {
			buf >>= litBits
			n -= litBits
			e = lit[int(e>>16)+int(buf&(1<<((e>>8)&15)-1))]
		}
		buf >>= e & 63
		n -= uint(e & lenMask)
		if e&fLiteral != 0 {
			if op >= len(out) {
				b.pos, b.buf, b.n = pos, buf, n
				return op, ErrOutputFull
			}
			out[op] = byte(e >> 16)
			op++
			continue
		}
		if e&fEOB != 0 {
			b.pos, b.buf, b.n = pos, buf, n
			return op, nil
		}
		if e&fInvalid != 0 {
			b.pos, b.buf, b.n = pos, buf, n
			return op, b.corrupt("invalid literal/length code")
		}
		x := (e >> 8) & 15
		length := int(e>>16) + int(buf&(1<<x-1))
		buf >>= x
		n -= uint(x)

		e = dist[buf&(1<<distBits-1)]
		if e&fSub != 0 {
			buf >>= distBits
			n -= distBits
			e = dist[int(e>>16)+int(buf&(1<<((e>>8)&15)-1))]
		}
		if e&fInvalid != 0 {
			b.pos, b.buf, b.n = pos, buf, n
			return op, b.corrupt("invalid distance code")
		}
		buf >>= e & 63
		n -= uint(e & lenMask)
		x = (e >> 8) & 15
		dd := int(e>>16) + int(buf&(1<<x-1))
		buf >>= x
		n -= uint(x)
		if dd > op {
			b.pos, b.buf, b.n = pos, buf, n
			return op, b.corrupt("distance %d reaches before the start of the output (%d bytes)", dd, op)
		}
		if length > len(out)-op {
			b.pos, b.buf, b.n = pos, buf, n
			return op, ErrOutputFull
		}
		for i := range length {
			out[op+i] = out[op+i-dd]
		}
		op += length
	}
}
