package nbd_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// rawClient speaks NBD byte by byte, to do what well-behaved clients never do.
type rawClient struct {
	t testing.TB
	c net.Conn
}

const (
	optMagic  = 0x49484156454f5054
	reqMagic  = 0x25609513
	simpleMag = 0x67446698
	chunkMag  = 0x668e33ef
)

func rawDial(t testing.TB, sock string) *rawClient {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	r := &rawClient{t: t, c: c}
	g := r.read(18)
	if binary.BigEndian.Uint64(g) != 0x4e42444d41474943 || binary.BigEndian.Uint64(g[8:]) != optMagic {
		t.Fatalf("greeting % x", g)
	}
	r.write(binary.BigEndian.AppendUint32(nil, 3)) // fixed newstyle, no zeroes
	return r
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawClient) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

func (r *rawClient) opt(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
}

func (r *rawClient) optReply(opt uint32) (uint32, []byte) {
	r.t.Helper()
	h := r.read(20)
	if binary.BigEndian.Uint32(h[8:]) != opt {
		r.t.Fatalf("reply to option %d, want %d", binary.BigEndian.Uint32(h[8:]), opt)
	}
	return binary.BigEndian.Uint32(h[12:]), r.read(int(binary.BigEndian.Uint32(h[16:])))
}

// enter negotiates structured replies (when asked) and GOes to an export.
func (r *rawClient) enter(name string, structured bool) {
	r.t.Helper()
	if structured {
		r.opt(nbd.OptStructuredReply, nil)
		if typ, _ := r.optReply(nbd.OptStructuredReply); typ != nbd.RepAck {
			r.t.Fatalf("structured reply refused: %x", typ)
		}
	}
	d := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, 0)
	r.opt(nbd.OptGo, d)
	for {
		typ, data := r.optReply(nbd.OptGo)
		if typ == nbd.RepAck {
			return
		}
		if typ != nbd.RepInfo {
			r.t.Fatalf("GO refused: %x %s", typ, data)
		}
	}
}

func (r *rawClient) request(flags, typ uint16, handle, off uint64, length uint32, payload []byte) {
	b := binary.BigEndian.AppendUint32(nil, reqMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	r.write(append(b, payload...))
}

// reply reads one reply message: simple (typ -1) or one structured chunk.
func (r *rawClient) reply() (magic uint32, code uint32, typ uint16, handle uint64, payload []byte) {
	r.t.Helper()
	h := r.read(4)
	magic = binary.BigEndian.Uint32(h)
	switch magic {
	case simpleMag:
		h = r.read(12)
		return magic, binary.BigEndian.Uint32(h), 0, binary.BigEndian.Uint64(h[4:]), nil
	case chunkMag:
		h = r.read(16)
		typ = binary.BigEndian.Uint16(h[2:])
		payload = r.read(int(binary.BigEndian.Uint32(h[12:])))
		if typ&0x8000 != 0 {
			code = binary.BigEndian.Uint32(payload)
		}
		return magic, code, typ, binary.BigEndian.Uint64(h[4:]), payload
	}
	r.t.Fatalf("bad reply magic %x", magic)
	return
}

// closedByPeer reports whether the server hung up (EOF) within a few seconds.
func (r *rawClient) closedByPeer() bool {
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	_, err := r.c.Read(b[:])
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || isReset(err)
}

func isReset(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && !oe.Timeout()
}

// TestHostileClients: each misbehaviour gets the spec's error or a closed
// connection, and the server keeps serving a well-behaved client.
func TestHostileClients(t *testing.T) {
	mem := block.NewMemory(1<<20, 4096)
	mem.WriteAt(bytes.Repeat([]byte{5}, 1<<20), 0)
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Name: "rw", Device: mem, Writable: true})

	t.Run("bad option magic", func(t *testing.T) {
		r := rawDial(t, sock)
		r.write(bytes.Repeat([]byte{0x42}, 16))
		if !r.closedByPeer() {
			t.Fatal("server kept a client with a bad option magic")
		}
	})
	t.Run("unknown client flags", func(t *testing.T) {
		c, _ := net.Dial("unix", sock)
		defer c.Close()
		io.ReadFull(c, make([]byte, 18))
		c.Write([]byte{0, 0, 0x80, 0})
		r := &rawClient{t: t, c: c}
		if !r.closedByPeer() {
			t.Fatal("server accepted unknown client flags")
		}
	})
	t.Run("unknown options", func(t *testing.T) {
		r := rawDial(t, sock)
		for _, o := range []uint32{4, 11, 12, 0xdead, 0xffffffff} {
			r.opt(o, []byte("some data"))
			if typ, _ := r.optReply(o); typ != nbd.RepErrUnsup {
				t.Fatalf("option %d: reply %x, want ERR_UNSUP", o, typ)
			}
		}
		r.opt(nbd.OptList, []byte("x")) // LIST takes no data
		if typ, _ := r.optReply(nbd.OptList); typ != nbd.RepErrInvalid {
			t.Fatalf("LIST with data: %x", typ)
		}
		r.opt(nbd.OptSetMetaContext, nil) // before structured replies
		if typ, _ := r.optReply(nbd.OptSetMetaContext); typ != nbd.RepErrInvalid {
			t.Fatalf("SET_META_CONTEXT without structured replies: %x", typ)
		}
		r.opt(nbd.OptGo, []byte{0, 0, 0, 9, 'a'}) // name length past the data
		if typ, _ := r.optReply(nbd.OptGo); typ != nbd.RepErrInvalid {
			t.Fatalf("malformed GO: %x", typ)
		}
		r.opt(nbd.OptStartTLS, nil) // no TLS configured
		if typ, _ := r.optReply(nbd.OptStartTLS); typ != nbd.RepErrPolicy {
			t.Fatalf("STARTTLS without TLS: %x", typ)
		}
		r.opt(nbd.OptAbort, nil)
		if typ, _ := r.optReply(nbd.OptAbort); typ != nbd.RepAck {
			t.Fatalf("ABORT: %x", typ)
		}
		if !r.closedByPeer() {
			t.Fatal("server kept the connection after ABORT")
		}
	})
	t.Run("oversize option", func(t *testing.T) {
		r := rawDial(t, sock)
		b := binary.BigEndian.AppendUint64(nil, optMagic)
		b = binary.BigEndian.AppendUint32(b, nbd.OptGo)
		b = binary.BigEndian.AppendUint32(b, 0xfffffff0)
		r.write(b)
		if typ, _ := r.optReply(nbd.OptGo); typ != nbd.RepErrTooBig {
			t.Fatalf("oversize option: %x", typ)
		}
		if !r.closedByPeer() {
			t.Fatal("server waited for 4 GiB of option data")
		}
	})
	t.Run("bad requests", func(t *testing.T) {
		for _, structured := range []bool{false, true} {
			r := rawDial(t, sock)
			r.enter("rw", structured)
			check := func(what string, handle uint64, want uint32) {
				t.Helper()
				_, code, _, h, _ := r.reply()
				if h != handle || code != want {
					t.Fatalf("%s (structured %v): handle %d error %d, want %d %d", what, structured, h, code, handle, want)
				}
			}
			r.request(0, nbd.CmdRead, 1, 0, 64<<20, nil)
			check("oversize READ", 1, nbd.EINVAL)
			r.request(0, nbd.CmdRead, 2, 1<<20-100, 4096, nil)
			check("READ past the end", 2, nbd.EINVAL)
			r.request(0, nbd.CmdRead, 3, 1<<63, 4096, nil)
			check("READ at a huge offset", 3, nbd.EINVAL)
			r.request(0, 42, 4, 0, 0, nil)
			check("unknown command", 4, nbd.EINVAL)
			r.request(0x8000, nbd.CmdFlush, 5, 0, 0, nil)
			check("unknown flag", 5, nbd.EINVAL)
			r.request(0, nbd.CmdWrite, 6, 1<<20-1, 2, []byte{1, 2})
			check("WRITE past the end", 6, nbd.ENOSPC)
			r.request(0, nbd.CmdBlockStatus, 7, 0, 4096, nil)
			check("BLOCK_STATUS without a context", 7, nbd.EINVAL)
			// Still serving this connection.
			r.request(0, nbd.CmdRead, 8, 4096, 8, nil)
			magic, code, typ, h, p := r.reply()
			if code != 0 || h != 8 {
				t.Fatalf("good READ after bad ones: code %d handle %d", code, h)
			}
			if magic == simpleMag {
				p = r.read(8)
			} else if typ != nbd.ReplyTypeOffsetData {
				t.Fatalf("chunk type %d", typ)
			} else {
				p = p[8:]
			}
			if !bytes.Equal(p, bytes.Repeat([]byte{5}, 8)) {
				t.Fatalf("read % x", p)
			}
			// Oversize WRITE: the payload cannot be skipped; hang up.
			r.request(0, nbd.CmdWrite, 9, 0, 64<<20, nil)
			if !r.closedByPeer() {
				t.Fatal("server kept a client announcing a 64 MiB WRITE")
			}
		}
	})
	t.Run("bad request magic", func(t *testing.T) {
		r := rawDial(t, sock)
		r.enter("rw", true)
		r.write(make([]byte, 28))
		if !r.closedByPeer() {
			t.Fatal("server kept a client with a bad request magic")
		}
	})
	t.Run("read-only", func(t *testing.T) {
		sock2, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Device: mem})
		r := rawDial(t, sock2)
		r.enter("", false)
		r.request(0, nbd.CmdWrite, 1, 0, 4, []byte{1, 2, 3, 4})
		if _, code, _, _, _ := r.reply(); code != nbd.EPERM {
			t.Fatalf("WRITE to a read-only export: %d, want EPERM", code)
		}
		r.request(0, nbd.CmdTrim, 2, 0, 4096, nil)
		if _, code, _, _, _ := r.reply(); code != nbd.EPERM {
			t.Fatalf("TRIM of a read-only export: %d, want EPERM", code)
		}
	})
	// The device was only ever written past its end or in refused ways.
	p := make([]byte, 1<<20)
	mem.ReadAt(p, 0)
	if !bytes.Equal(p, bytes.Repeat([]byte{5}, 1<<20)) {
		t.Fatal("a refused request changed the device")
	}
}

// TestManyDroppingClients: 100 clients drop mid-handshake or mid-request
// (some with 32 MiB WRITEs half sent, some with replies never read) while a
// good client keeps reading; the good client never fails, and afterwards
// the server's goroutines and heap return to a bounded level.
func TestManyDroppingClients(t *testing.T) {
	size := int64(4 << 20)
	mem := block.NewMemory(size, 4096)
	mem.WriteAt(bytes.Repeat([]byte{9}, int(size)), 0)
	sock, _ := serve(t, nbd.ServerOptions{Memory: 64 << 20}, nbd.Export{Device: mem, Writable: true})
	runtime.GC()
	baseG := runtime.NumGoroutine()

	good := dial(t, unixURI(sock, ""), nbd.ClientOptions{Connections: 1})
	stop := make(chan struct{})
	goodDone := make(chan error, 1)
	go func() {
		p := make([]byte, 256<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				goodDone <- nil
				return
			default:
			}
			if _, err := good.ReadAt(p, int64(i%16)*(256<<10)); err != nil {
				goodDone <- err
				return
			}
			if p[0] != 9 || p[len(p)-1] != 9 {
				goodDone <- errors.New("good client read wrong bytes")
				return
			}
		}
	}()

	// Sample the live heap (after a GC) while the flood runs.
	var base runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&base)
	var peak uint64
	sampled := make(chan struct{})
	stopSampling := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stopSampling:
				return
			case <-time.After(10 * time.Millisecond):
			}
			var ms runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > base.HeapAlloc {
				peak = max(peak, ms.HeapAlloc-base.HeapAlloc)
			}
		}
	}()
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			r := &rawClient{t: t, c: c}
			io.ReadFull(c, make([]byte, 18))
			switch i % 5 {
			case 0: // drop right after the greeting
				return
			case 1: // drop inside option data
				c.Write(binary.BigEndian.AppendUint32(nil, 1))
				b := binary.BigEndian.AppendUint64(nil, optMagic)
				b = binary.BigEndian.AppendUint32(b, nbd.OptGo)
				b = binary.BigEndian.AppendUint32(b, 1000)
				c.Write(append(b, 0, 0))
				return
			}
			c.Write(binary.BigEndian.AppendUint32(nil, 3))
			r.enter("", i%2 == 0)
			switch i % 5 {
			case 2: // half a 32 MiB WRITE, then gone
				r.request(0, nbd.CmdWrite, 1, 0, 32<<20, make([]byte, 1<<20))
				time.Sleep(100 * time.Millisecond)
			case 3: // many reads, replies never read
				for h := uint64(0); h < 200; h++ {
					r.request(0, nbd.CmdRead, h, 0, 1<<20, nil)
				}
			case 4: // half a request header
				c.Write([]byte{0x25, 0x60, 0x95})
			}
		}(i)
	}
	wg.Wait()
	time.Sleep(200 * time.Millisecond)
	close(stopSampling)
	<-sampled
	close(stop)
	if err := <-goodDone; err != nil {
		t.Fatalf("the good client failed while others misbehaved: %v", err)
	}
	good.Close()
	// Every connection is gone soon: goroutines return to the baseline.
	deadline := time.Now().Add(60 * time.Second)
	for {
		runtime.GC()
		g := runtime.NumGoroutine()
		if g <= baseG+8 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines remain (baseline %d):\n%s", g, baseG, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(50 * time.Millisecond)
	}
	// 20 clients announced 32 MiB WRITEs at once (640 MiB unbounded); the
	// 64 MiB budget lets at most two such buffers live together. HeapAlloc
	// sampled after a GC can also count buffers released (and replaced)
	// since that GC, so the bound is twice the budget, plus slack for
	// pooled buffers and the clients' own garbage.
	if peak > 176<<20 {
		t.Fatalf("live heap grew by %d MiB with a 64 MiB request budget", peak>>20)
	}
	t.Logf("live heap grew by at most %d MiB", peak>>20)
}

// TestRawFlags checks flags well-behaved clients rarely send: REQ_ONE gives
// one descriptor, DF one data chunk with the hole's zeros inside it, CACHE
// and FAST_ZERO answer as the spec says.
func TestRawFlags(t *testing.T) {
	mem := block.NewMemory(1<<20, 4096)
	mem.WriteAt(bytes.Repeat([]byte{3}, 8192), 0) // data, then a hole
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Device: mem, Writable: true})
	r := rawDial(t, sock)
	r.opt(nbd.OptStructuredReply, nil)
	r.optReply(nbd.OptStructuredReply)
	r.opt(nbd.OptSetMetaContext, metaData("", nbd.ContextBaseAllocation))
	if typ, data := r.optReply(nbd.OptSetMetaContext); typ != nbd.RepMetaContext || string(data[4:]) != nbd.ContextBaseAllocation {
		t.Fatalf("SET_META_CONTEXT: %x %q", typ, data)
	}
	if typ, _ := r.optReply(nbd.OptSetMetaContext); typ != nbd.RepAck {
		t.Fatalf("SET_META_CONTEXT end: %x", typ)
	}
	r.enter("", false)
	descs := func(flags uint16) int {
		r.request(flags, nbd.CmdBlockStatus, 1, 0, 1<<20, nil)
		_, code, typ, _, p := r.reply()
		if code != 0 || typ != nbd.ReplyTypeBlockStatus {
			t.Fatalf("BLOCK_STATUS: code %d type %d", code, typ)
		}
		return (len(p) - 4) / 8
	}
	if n := descs(0); n != 2 {
		t.Fatalf("BLOCK_STATUS: %d descriptors, want 2 (data, hole)", n)
	}
	if n := descs(nbd.CmdFlagReqOne); n != 1 {
		t.Fatalf("BLOCK_STATUS with REQ_ONE: %d descriptors", n)
	}
	r.request(nbd.CmdFlagDF, nbd.CmdRead, 2, 4096, 8192, nil)
	_, code, typ, _, p := r.reply()
	if code != 0 || typ != nbd.ReplyTypeOffsetData || len(p) != 8+8192 ||
		!bytes.Equal(p[8:8+4096], bytes.Repeat([]byte{3}, 4096)) || !bytes.Equal(p[8+4096:], make([]byte, 4096)) {
		t.Fatalf("DF read: code %d type %d len %d", code, typ, len(p))
	}
	r.request(0, nbd.CmdRead, 3, 4096, 8192, nil) // without DF: data chunk, then a hole chunk
	if _, _, typ, _, _ := r.reply(); typ != nbd.ReplyTypeOffsetData {
		t.Fatalf("first chunk type %d", typ)
	}
	if _, _, typ, _, p := r.reply(); typ != nbd.ReplyTypeOffsetHole || binary.BigEndian.Uint32(p[8:]) != 4096 {
		t.Fatalf("second chunk type %d", typ)
	}
	r.request(0, nbd.CmdCache, 4, 0, 1<<20, nil)
	if _, code, _, _, _ := r.reply(); code != 0 {
		t.Fatalf("CACHE: %d", code)
	}
	r.request(nbd.CmdFlagFastZero|nbd.CmdFlagNoHole, nbd.CmdWriteZeroes, 5, 0, 4096, nil)
	if _, code, _, _, _ := r.reply(); code != nbd.ENOTSUP {
		t.Fatalf("FAST_ZERO|NO_HOLE: %d, want ENOTSUP", code)
	}
	r.request(nbd.CmdFlagFastZero, nbd.CmdWriteZeroes, 6, 0, 4096, nil)
	if _, code, _, _, _ := r.reply(); code != 0 {
		t.Fatalf("FAST_ZERO: %d", code)
	}
	r.request(0, nbd.CmdDisc, 7, 0, 0, nil)
	if !r.closedByPeer() {
		t.Fatal("server kept the connection after DISC")
	}
}
