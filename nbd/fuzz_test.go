package nbd_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// scriptConn is a net.Conn whose client side is a fixed byte script; what
// the server writes is discarded.
type scriptConn struct {
	r io.Reader
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// script builds client byte streams for the seed corpus.
type script struct{ bytes.Buffer }

func (s *script) u16(v uint16) *script { s.Write(binary.BigEndian.AppendUint16(nil, v)); return s }
func (s *script) u32(v uint32) *script { s.Write(binary.BigEndian.AppendUint32(nil, v)); return s }
func (s *script) u64(v uint64) *script { s.Write(binary.BigEndian.AppendUint64(nil, v)); return s }
func (s *script) opt(o uint32, data []byte) *script {
	s.u64(optMagic).u32(o).u32(uint32(len(data)))
	s.Write(data)
	return s
}
func (s *script) req(flags, typ uint16, off uint64, n uint32, payload []byte) *script {
	s.u32(reqMagic).u16(flags).u16(typ).u64(7).u64(off).u32(n)
	s.Write(payload)
	return s
}

func metaData(export string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

func goData(export string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// FuzzServer feeds arbitrary client bytes to a server connection serving a
// writable export: option haggling and request parsing must never panic,
// hang, or write outside the device.
func FuzzServer(f *testing.F) {
	var s script
	s.u32(3).
		opt(nbd.OptList, nil).
		opt(nbd.OptStructuredReply, nil).
		opt(nbd.OptListMetaContext, metaData("", "base:")).
		opt(nbd.OptSetMetaContext, metaData("", nbd.ContextBaseAllocation)).
		opt(nbd.OptInfo, goData("", nbd.InfoName, nbd.InfoDescription, nbd.InfoBlockSize)).
		opt(nbd.OptGo, goData("", nbd.InfoBlockSize)).
		req(0, nbd.CmdRead, 0, 8192, nil).
		req(nbd.CmdFlagDF, nbd.CmdRead, 100, 1000, nil).
		req(nbd.CmdFlagFUA, nbd.CmdWrite, 4096, 4, []byte{1, 2, 3, 4}).
		req(0, nbd.CmdBlockStatus, 0, 65536, nil).
		req(nbd.CmdFlagReqOne, nbd.CmdBlockStatus, 0, 65536, nil).
		req(nbd.CmdFlagNoHole, nbd.CmdWriteZeroes, 0, 512, nil).
		req(0, nbd.CmdTrim, 8192, 4096, nil).
		req(0, nbd.CmdCache, 0, 65536, nil).
		req(0, nbd.CmdFlush, 0, 0, nil).
		req(0, nbd.CmdDisc, 0, 0, nil)
	f.Add(s.Bytes())
	var s2 script
	s2.u32(1).opt(nbd.OptExportName, nil).req(0, nbd.CmdRead, 65000, 1000, nil).req(0, nbd.CmdWrite, 0, 3, []byte{9, 9, 9})
	f.Add(s2.Bytes())
	var s3 script
	s3.u32(3).opt(nbd.OptStartTLS, nil).opt(nbd.OptAbort, nil)
	f.Add(s3.Bytes())
	f.Add([]byte{0, 0, 0, 3, 0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff})

	f.Fuzz(func(t *testing.T, in []byte) {
		const size = 64 << 10
		mem := block.NewMemory(size, 4096)
		srv, err := nbd.NewServer(nbd.ServerOptions{}, nbd.Export{Device: mem, Writable: true})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.ServeConn(ctx, &scriptConn{r: bytes.NewReader(in)})
		if ctx.Err() != nil {
			t.Fatal("server connection did not end when its input did")
		}
		if mem.Size() != size {
			t.Fatal("device size changed")
		}
	})
}
