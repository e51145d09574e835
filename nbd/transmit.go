package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// request is one decoded transmission request.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
}

// allowedFlags lists the command flags valid per command.
var allowedFlags = map[uint16]uint16{
	CmdRead:        CmdFlagFUA | CmdFlagDF,
	CmdWrite:       CmdFlagFUA,
	CmdFlush:       CmdFlagFUA,
	CmdTrim:        CmdFlagFUA,
	CmdCache:       CmdFlagFUA,
	CmdWriteZeroes: CmdFlagFUA | CmdFlagNoHole | CmdFlagFastZero,
	CmdBlockStatus: CmdFlagFUA | CmdFlagReqOne,
}

// zeroes is a read-only source of zero bytes for NO_HOLE writes.
var zeroes = make([]byte, readChunk)

func (c *serverConn) transmit(ctx context.Context, exp *Export) error {
	c.exp, c.dev = exp, exp.Device
	if exp.Writable {
		c.wdev = exp.Device.(block.Writable)
	}
	c.flags = c.exportFlags(exp)
	c.baseCtx = c.metaBase && c.metaExport == exp.Name
	c.ctx = ctx
	c.connMem = semaphore.NewWeighted(c.s.opts.ConnMemory)
	c.fm, c.rc = nil, nil
	if fm, ok := exp.Device.(block.FileMapper); ok {
		// A plain socket (not TLS) takes file data straight from the page
		// cache: no read into a buffer, no copy of it into the socket.
		if sc, ok := c.nc.(syscall.Conn); ok && !c.tls {
			if rc, err := sc.SyscallConn(); err == nil {
				c.fm, c.rc = fm, rc
			}
		}
	}
	// Workers take turns reading a request and then serve it themselves, as
	// nbdkit's threads do: no hand-off between a reader and a handler, and
	// at most Workers requests of a connection run at once.
	var (
		rmu     sync.Mutex
		stopped bool
		first   error
		wg      sync.WaitGroup
	)
	for i := 0; i < c.s.opts.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				rmu.Lock()
				if stopped {
					rmu.Unlock()
					return
				}
				req, payload, w, err := c.next(ctx)
				if err != nil || req.typ == CmdDisc {
					stopped, first = true, err
					rmu.Unlock()
					return
				}
				rmu.Unlock()
				c.handle(req, payload)
				if payload != nil {
					c.s.pools.put(payload)
				}
				c.release(w)
			}
		}()
	}
	wg.Wait()
	if errors.Is(first, io.EOF) {
		return nil
	}
	return first
}

// next reads one request (and a WRITE's payload) and charges its memory.
// A DISC request comes back with no error; the connection then ends once
// the requests in flight are answered.
func (c *serverConn) next(ctx context.Context) (request, *[]byte, int64, error) {
	var hdr [requestHdr]byte
	if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return request{}, nil, 0, io.EOF
		}
		return request{}, nil, 0, fmt.Errorf("reading request: %w", err)
	}
	if m := binary.BigEndian.Uint32(hdr[0:]); m != magicRequest {
		return request{}, nil, 0, fmt.Errorf("bad request magic 0x%x", m)
	}
	req := request{
		flags:  binary.BigEndian.Uint16(hdr[4:]),
		typ:    binary.BigEndian.Uint16(hdr[6:]),
		handle: binary.BigEndian.Uint64(hdr[8:]),
		off:    binary.BigEndian.Uint64(hdr[16:]),
		length: binary.BigEndian.Uint32(hdr[24:]),
	}
	if req.typ == CmdDisc {
		return req, nil, 0, nil
	}
	if req.typ == CmdWrite && req.length > MaxRequest {
		// The payload cannot be skipped without reading it all.
		return req, nil, 0, fmt.Errorf("WRITE of %d bytes exceeds the maximum block size %d", req.length, MaxRequest)
	}
	w := c.weight(req)
	if err := c.acquire(ctx, w); err != nil {
		return req, nil, 0, err
	}
	if req.typ != CmdWrite {
		return req, nil, w, nil
	}
	payload := c.s.pools.get(int(req.length))
	c.nc.SetReadDeadline(time.Now().Add(c.s.opts.PayloadTimeout))
	_, err := io.ReadFull(c.r, (*payload)[:req.length])
	c.nc.SetReadDeadline(time.Time{})
	if err != nil {
		c.s.pools.put(payload)
		c.release(w)
		return req, nil, 0, fmt.Errorf("reading WRITE payload: %w", err)
	}
	return req, payload, w, nil
}

// weight is the memory a request may hold while it is served.
func (c *serverConn) weight(req request) int64 {
	n := int64(minWeight)
	switch req.typ {
	case CmdWrite:
		n = min(int64(req.length), MaxRequest)
	case CmdRead:
		if req.length <= MaxRequest {
			n = int64(req.length)
			if c.structured && req.flags&CmdFlagDF == 0 {
				n = min(n, readChunk+dataHdr)
			}
		}
	case CmdCache:
		n = readChunk
	case CmdBlockStatus:
		n = maxDescs*8 + dataHdr
	}
	return max(n, minWeight)
}

func (c *serverConn) acquire(ctx context.Context, w int64) error {
	if err := c.connMem.Acquire(ctx, w); err != nil {
		return err
	}
	if err := c.s.mem.Acquire(ctx, w); err != nil {
		c.connMem.Release(w)
		return err
	}
	return nil
}

func (c *serverConn) release(w int64) {
	c.s.mem.Release(w)
	c.connMem.Release(w)
}

// handle serves one request and sends its reply.
func (c *serverConn) handle(req request, payload *[]byte) {
	if c.isDead() {
		return // nobody to answer: skip the device work
	}
	if name, known := cmdNames[req.typ]; !known || req.typ == CmdDisc {
		c.replyErr(req, EINVAL, fmt.Sprintf("unknown command %d", req.typ))
		return
	} else if req.flags&^allowedFlags[req.typ] != 0 {
		c.replyErr(req, EINVAL, fmt.Sprintf("flags 0x%x not valid for %s", req.flags, name))
		return
	}
	size := uint64(c.dev.Size())
	end := req.off + uint64(req.length)
	inside := end >= req.off && end <= size
	off, n := int64(req.off), int64(req.length)
	writes := req.typ == CmdWrite || req.typ == CmdTrim || req.typ == CmdWriteZeroes
	switch {
	case writes && c.wdev == nil:
		c.replyErr(req, EPERM, "export is read-only")
		return
	case writes && !inside:
		c.replyErr(req, ENOSPC, fmt.Sprintf("range [%d,+%d) ends past the export size %d", req.off, req.length, size))
		return
	case (req.typ == CmdRead || req.typ == CmdCache || req.typ == CmdBlockStatus) && !inside:
		c.replyErr(req, EINVAL, fmt.Sprintf("range [%d,+%d) ends past the export size %d", req.off, req.length, size))
		return
	}
	var err error
	switch req.typ {
	case CmdRead:
		c.read(req)
		return
	case CmdBlockStatus:
		c.blockStatus(req)
		return
	case CmdWrite:
		_, err = c.wdev.WriteAt((*payload)[:req.length], off)
	case CmdFlush:
		if c.wdev != nil {
			err = c.wdev.Flush()
		}
	case CmdTrim:
		err = c.wdev.Trim(off, n)
	case CmdWriteZeroes:
		switch {
		case req.flags&CmdFlagNoHole != 0 && req.flags&CmdFlagFastZero != 0:
			c.replyErr(req, ENOTSUP, "zeroing without holes is a plain write here, not fast")
			return
		case req.flags&CmdFlagNoHole != 0:
			for pos := off; pos < off+n && err == nil; pos += readChunk {
				_, err = c.wdev.WriteAt(zeroes[:min(readChunk, off+n-pos)], pos)
			}
		default:
			err = c.wdev.Zero(off, n)
		}
	case CmdCache:
		err = c.cache(off, n)
	}
	if err == nil && req.flags&CmdFlagFUA != 0 && writes {
		err = c.wdev.Flush()
	}
	if err != nil {
		c.replyErr(req, errorCode(err), err.Error())
		return
	}
	c.replyOK(req)
}

// cache reads the data of a range through (warming any cache below) without
// sending it.
func (c *serverConn) cache(off, n int64) error {
	buf := c.s.pools.get(readChunk)
	defer c.s.pools.put(buf)
	return block.Walk(c.ctx, c.dev, off, n, 64<<20, func(e block.Extent) error {
		if e.Type != block.Data {
			return nil
		}
		for pos := e.Off; pos < e.End(); pos += readChunk {
			k := min(readChunk, e.End()-pos)
			if err := readFull(c.dev, (*buf)[:k], pos); err != nil {
				return err
			}
		}
		return nil
	})
}

func readFull(d block.Device, p []byte, off int64) error {
	n, err := d.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading [%d,+%d): %w", off, len(p), err)
}

// read answers NBD_CMD_READ.
func (c *serverConn) read(req request) {
	off, n := int64(req.off), int64(req.length)
	if req.length > MaxRequest {
		c.replyErr(req, EINVAL, fmt.Sprintf("READ of %d bytes exceeds the maximum block size %d", n, MaxRequest))
		return
	}
	if !c.structured || req.flags&CmdFlagDF != 0 {
		hdr := simpleHdr
		if c.structured {
			hdr = dataHdr
		}
		buf := c.s.pools.get(hdr + int(n))
		defer c.s.pools.put(buf)
		b := (*buf)[:hdr+int(n)]
		if err := readFull(c.dev, b[hdr:], off); err != nil {
			c.replyErr(req, errorCode(err), err.Error())
			return
		}
		if c.structured {
			putChunkHdr(b, replyFlagDone, ReplyTypeOffsetData, req.handle, uint32(n+8))
			binary.BigEndian.PutUint64(b[chunkHdr:], req.off)
		} else {
			putSimpleHdr(b, 0, req.handle)
		}
		c.send(b)
		return
	}
	if n == 0 {
		var b [chunkHdr]byte
		putChunkHdr(b[:], replyFlagDone, ReplyTypeNone, req.handle, 0)
		c.send(b[:])
		return
	}
	var exts []block.Extent
	var err error
	if c.exp.cache != nil {
		exts, err = c.exp.cache.extents(c.ctx, off, n)
	} else {
		exts, err = c.dev.Extents(c.ctx, off, n)
	}
	if err == nil {
		err = block.Check(exts, off, n)
	}
	if err != nil {
		c.s.log.Debug("extents failed, reading the range as data", "off", off, "len", n, "err", err)
		exts = []block.Extent{{Off: off, Len: n, Type: block.Data}}
	}
	var buf *[]byte
	defer func() {
		if buf != nil {
			c.s.pools.put(buf)
		}
	}()
	for i, e := range exts {
		lastExt := i == len(exts)-1
		if e.Type.ReadsZero() {
			var b [chunkHdr + 12]byte
			flags := uint16(0)
			if lastExt {
				flags = replyFlagDone
			}
			putChunkHdr(b[:], flags, ReplyTypeOffsetHole, req.handle, 12)
			binary.BigEndian.PutUint64(b[chunkHdr:], uint64(e.Off))
			binary.BigEndian.PutUint32(b[chunkHdr+8:], uint32(e.Len))
			if !c.send(b[:]) {
				return
			}
			continue
		}
		if c.fm != nil {
			if fd, foff, ok := c.fm.MapFile(e.Off, e.Len); ok {
				// One chunk for the whole extent: no buffer limits it.
				var h [dataHdr]byte
				flags := uint16(0)
				if lastExt {
					flags = replyFlagDone
				}
				putChunkHdr(h[:], flags, ReplyTypeOffsetData, req.handle, uint32(e.Len+8))
				binary.BigEndian.PutUint64(h[chunkHdr:], uint64(e.Off))
				if !c.sendFile(h[:], fd, foff, e.Len) {
					return
				}
				continue
			}
		}
		if buf == nil {
			buf = c.s.pools.get(dataHdr + int(min(readChunk, n)))
		}
		for pos := e.Off; pos < e.End(); {
			k := min(readChunk, e.End()-pos)
			b := (*buf)[:dataHdr+int(k)]
			if err := readFull(c.dev, b[dataHdr:], pos); err != nil {
				c.replyErrAt(req, errorCode(err), err.Error(), pos)
				return
			}
			flags := uint16(0)
			if lastExt && pos+k == e.End() {
				flags = replyFlagDone
			}
			putChunkHdr(b, flags, ReplyTypeOffsetData, req.handle, uint32(k+8))
			binary.BigEndian.PutUint64(b[chunkHdr:], uint64(pos))
			if !c.send(b) {
				return
			}
			pos += k
		}
	}
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *serverConn) blockStatus(req request) {
	if !c.baseCtx {
		c.replyErr(req, EINVAL, "no metadata context was selected for this export")
		return
	}
	if req.length == 0 {
		c.replyErr(req, EINVAL, "BLOCK_STATUS of zero bytes")
		return
	}
	off, n := int64(req.off), int64(req.length)
	exts, err := c.dev.Extents(c.ctx, off, n)
	if err == nil {
		err = block.Check(exts, off, n)
	}
	if err != nil {
		c.replyErr(req, errorCode(err), fmt.Sprintf("extents of [%d,+%d): %v", off, n, err))
		return
	}
	limit := maxDescs
	if req.flags&CmdFlagReqOne != 0 {
		limit = 1
	}
	b := make([]byte, chunkHdr, chunkHdr+4+8*min(len(exts), limit))
	b = binary.BigEndian.AppendUint32(b, baseAllocationID)
	var last uint32 = 1 << 31
	count := 0
	for _, e := range exts {
		st := stateOf(e.Type)
		if count > 0 && st == last {
			// Same flags as the previous descriptor: extend it.
			i := len(b) - 8
			binary.BigEndian.PutUint32(b[i:], binary.BigEndian.Uint32(b[i:])+uint32(e.Len))
			continue
		}
		if count == limit {
			break
		}
		b = binary.BigEndian.AppendUint32(b, uint32(e.Len))
		b = binary.BigEndian.AppendUint32(b, st)
		last = st
		count++
	}
	putChunkHdr(b, replyFlagDone, ReplyTypeBlockStatus, req.handle, uint32(len(b)-chunkHdr))
	c.send(b)
}

// stateOf maps an extent type to base:allocation flags.
func stateOf(t block.ExtentType) uint32 {
	switch t {
	case block.Hole:
		return StateHole | StateZero
	case block.Zero:
		return StateZero
	}
	return 0
}

func putChunkHdr(b []byte, flags, typ uint16, handle uint64, length uint32) {
	binary.BigEndian.PutUint32(b[0:], magicStructuredReply)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint32(b[16:], length)
}

func putSimpleHdr(b []byte, code uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], code)
	binary.BigEndian.PutUint64(b[8:], handle)
}

func (c *serverConn) replyOK(req request) {
	var b [simpleHdr]byte
	putSimpleHdr(b[:], 0, req.handle)
	c.send(b[:])
}

func (c *serverConn) replyErr(req request, code uint32, msg string) {
	c.replyErrAt(req, code, msg, -1)
}

// replyErrAt sends an error: a structured error chunk (with the message, and
// the offset when at >= 0) when structured replies are on, else a simple reply.
func (c *serverConn) replyErrAt(req request, code uint32, msg string, at int64) {
	c.s.log.Debug("nbd request failed", "cmd", cmdNames[req.typ], "off", req.off, "len", req.length, "err", msg)
	if !c.structured {
		var b [simpleHdr]byte
		putSimpleHdr(b[:], code, req.handle)
		c.send(b[:])
		return
	}
	if len(msg) > maxString {
		msg = msg[:maxString]
	}
	typ := uint16(ReplyTypeError)
	n := 6 + len(msg)
	if at >= 0 {
		typ, n = ReplyTypeErrorOffset, n+8
	}
	b := make([]byte, chunkHdr, chunkHdr+n)
	putChunkHdr(b, replyFlagDone, typ, req.handle, uint32(n))
	b = binary.BigEndian.AppendUint32(b, code)
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if at >= 0 {
		b = binary.BigEndian.AppendUint64(b, uint64(at))
	}
	c.send(b)
}

func (c *serverConn) isDead() bool { return c.dead.Load() }

// send writes one whole reply message (or chunk). It reports false once the
// connection is broken; the request reader then ends too.
func (c *serverConn) send(b []byte) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.dead.Load() {
		return false
	}
	c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
	if _, err := c.nc.Write(b); err != nil {
		c.dead.Store(true)
		c.nc.Close()
		return false
	}
	return true
}

// sendFile sends hdr and then n bytes of the file fd from offset off with
// sendfile(2), as one message. Once the header is on the wire a failure
// (an I/O error, a file shortened under the export) cannot be answered in
// the protocol any more: the connection is closed, as for a failed send.
func (c *serverConn) sendFile(hdr []byte, fd uintptr, off, n int64) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.dead.Load() {
		return false
	}
	c.nc.SetWriteDeadline(time.Now().Add(c.s.opts.WriteTimeout))
	_, err := c.nc.Write(hdr)
	if err == nil {
		var serr error
		err = c.rc.Write(func(sock uintptr) bool {
			for n > 0 {
				m, err := unix.Sendfile(int(sock), int(fd), &off, int(min(n, 1<<30)))
				if m > 0 {
					n -= int64(m) // off moved on with it
				}
				switch {
				case errors.Is(err, unix.EAGAIN):
					return false // wait until the socket takes more
				case errors.Is(err, unix.EINTR):
				case err != nil:
					serr = err
					return true
				case m == 0:
					serr = fmt.Errorf("file ends %d bytes early", n)
					return true
				}
			}
			return true
		})
		if err == nil {
			err = serr
		}
	}
	if err != nil {
		c.s.log.Debug("nbd sendfile failed; closing the connection", "err", err)
		c.dead.Store(true)
		c.nc.Close()
		return false
	}
	return true
}

// bufPools recycles request buffers by power-of-two size class.
type bufPools struct {
	classes [27]sync.Pool // 2^0 .. 2^26 (64 MiB) plus header room
}

const (
	bufSlack  = 64
	maxPooled = 4<<20 + bufSlack
)

func sizeClass(n int) int {
	k := 12 // never smaller than 4 KiB
	for 1<<k < n-bufSlack && k < 26 {
		k++
	}
	return k
}

func (p *bufPools) get(n int) *[]byte {
	k := sizeClass(n)
	if v := p.classes[k].Get(); v != nil {
		b := v.(*[]byte)
		if cap(*b) >= n {
			*b = (*b)[:n]
			return b
		}
	}
	b := make([]byte, n, max(n, 1<<k+bufSlack))
	return &b
}

func (p *bufPools) put(b *[]byte) {
	if cap(*b) > maxPooled {
		return // rare; pooling it would pin up to 32 MiB per buffer
	}
	k := sizeClass(cap(*b))
	if cap(*b) < 1<<k+bufSlack {
		k-- // a short buffer goes one class down so gets never see it too small
		if k < 12 {
			return
		}
	}
	p.classes[k].Put(b)
}
