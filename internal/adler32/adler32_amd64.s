#include "textflag.h"

// Weights of the bytes of a 32-byte block: byte j counts 32-j times in s2.
DATA weights<>+0x00(SB)/8, $0x191a1b1c1d1e1f20
DATA weights<>+0x08(SB)/8, $0x1112131415161718
DATA weights<>+0x10(SB)/8, $0x090a0b0c0d0e0f10
DATA weights<>+0x18(SB)/8, $0x0102030405060708
GLOBL weights<>(SB), RODATA|NOPTR, $32

// func blocksAVX2(p *byte, n int, out *[24]uint32)
TEXT ·blocksAVX2(SB), NOSPLIT, $0-24
	MOVQ p+0(FP), SI
	MOVQ n+8(FP), CX
	MOVQ out+16(FP), DI
	VPXOR Y4, Y4, Y4           // byte sums (in the low dword of each qword)
	VPXOR Y5, Y5, Y5           // running sum of Y4 before each block
	VPXOR Y6, Y6, Y6           // weighted sums
	VPXOR Y7, Y7, Y7           // zero, for VPSADBW
	VMOVDQU weights<>(SB), Y8
	VPCMPEQW Y9, Y9, Y9
	VPSRLW $15, Y9, Y9         // 16-bit ones, for VPMADDWD

loop:
	VMOVDQU (SI), Y0
	VPADDD Y4, Y5, Y5
	VPSADBW Y7, Y0, Y1         // four sums of eight bytes
	VPADDD Y1, Y4, Y4
	VPMADDUBSW Y8, Y0, Y2      // unsigned bytes × signed weights, pairs summed to 16 bits
	VPMADDWD Y9, Y2, Y2        // pairs of those summed to 32 bits
	VPADDD Y2, Y6, Y6
	ADDQ $32, SI
	DECQ CX
	JNZ loop

	VMOVDQU Y4, 0(DI)
	VMOVDQU Y5, 32(DI)
	VMOVDQU Y6, 64(DI)
	VZEROUPPER
	RET
