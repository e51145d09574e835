package nbd

import (
	"bufio"
	"cmp"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// ClientOptions tune Dial. The zero value is a sensible default.
type ClientOptions struct {
	// TLS overrides the TLS configuration an nbds URI implies; setting it on
	// a plain nbd URI turns TLS on.
	TLS *tls.Config
	// Connections is how many connections to open when the server allows
	// multi-conn (default 4); without multi-conn there is always one.
	Connections int
	// MetaContexts are negotiated on every connection besides
	// base:allocation, so BlockStatus on them needs no extra connection.
	MetaContexts []string
	// InFlight bounds the requests in flight per connection (default 64).
	InFlight int
	// NoStructuredReplies asks for simple replies only (for tests and for
	// odd servers).
	NoStructuredReplies bool
	// Dialer opens the transport connection (default net.Dialer).
	Dialer func(ctx context.Context, network, address string) (net.Conn, error)
}

// Status is one block status descriptor of a metadata context, as an
// absolute range of the export.
type Status struct {
	Off   int64  `json:"offset"`
	Len   int64  `json:"length"`
	Flags uint32 `json:"flags"`
}

// Client is an NBD export as a block device (block.Writable; writes fail
// on a read-only export). It is safe for concurrent use: requests from many
// goroutines are pipelined on its connections.
type Client struct {
	target Target
	opts   ClientOptions
	tls    *tls.Config

	size       int64
	flags      uint16
	minBlock   int64
	maxBlock   int64
	structured bool
	contexts   []string // negotiated on every main connection

	conns []*clientConn
	rr    atomic.Uint32

	mu     sync.Mutex
	side   map[string]*clientConn // lazily opened for other contexts
	closed bool
}

var _ block.Writable = (*Client)(nil)

// Dial connects to the export an NBD URI names (see ParseURI).
func Dial(ctx context.Context, uri string, opts ClientOptions) (*Client, error) {
	t, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return Connect(ctx, t, opts)
}

// Connect connects to a target.
func Connect(ctx context.Context, t Target, opts ClientOptions) (*Client, error) {
	if opts.Connections <= 0 {
		opts.Connections = 4
	}
	if opts.InFlight <= 0 {
		opts.InFlight = 64
	}
	if opts.Dialer == nil {
		var d net.Dialer
		opts.Dialer = d.DialContext
	}
	c := &Client{target: t, opts: opts, tls: opts.TLS, side: map[string]*clientConn{}}
	if c.tls == nil && t.TLS {
		cfg, err := t.tlsConfig()
		if err != nil {
			return nil, fmt.Errorf("nbd %s: %w", t, err)
		}
		c.tls = cfg
	}
	contexts := []string{ContextBaseAllocation}
	for _, m := range opts.MetaContexts {
		if !slices.Contains(contexts, m) {
			contexts = append(contexts, m)
		}
	}
	first, err := c.dial(ctx, contexts)
	if err != nil {
		return nil, err
	}
	c.conns = []*clientConn{first}
	c.size, c.flags, c.structured = first.size, first.flags, first.structured
	c.minBlock, c.maxBlock = first.minBlock, first.maxBlock
	for _, m := range contexts {
		if _, ok := first.ctxID[m]; ok {
			c.contexts = append(c.contexts, m)
		}
	}
	if c.flags&FlagCanMultiConn != 0 {
		// Extra connections are a bonus: a server may advertise multi-conn
		// yet accept only one client at a time (qemu-nbd without -e), so a
		// slow greeting ends the attempt and the client keeps what it has.
		for i := 1; i < opts.Connections; i++ {
			ectx, cancel := context.WithTimeout(ctx, 3*time.Second)
			cc, err := c.dial(ectx, contexts)
			cancel()
			if err != nil {
				break
			}
			if cc.size != c.size || cc.flags != c.flags {
				cc.close()
				c.Close()
				return nil, fmt.Errorf("nbd %s: connection %d sees a different export (size %d, flags 0x%x)", t, i, cc.size, cc.flags)
			}
			c.conns = append(c.conns, cc)
		}
	}
	return c, nil
}

// Size implements block.Device.
func (c *Client) Size() int64 { return c.size }

// Flags returns the export's transmission flags.
func (c *Client) Flags() uint16 { return c.flags }

// ReadOnly reports whether the server refuses writes.
func (c *Client) ReadOnly() bool { return c.flags&FlagReadOnly != 0 }

// Connections returns how many connections carry requests.
func (c *Client) Connections() int { return len(c.conns) }

// Contexts returns the metadata contexts negotiated on every connection.
func (c *Client) Contexts() []string { return slices.Clone(c.contexts) }

// Structured reports whether structured replies were negotiated.
func (c *Client) Structured() bool { return c.structured }

// Target returns where the client is connected.
func (c *Client) Target() Target { return c.target }

func (c *Client) pick() *clientConn {
	if len(c.conns) == 1 {
		return c.conns[0]
	}
	return c.conns[int(c.rr.Add(1))%len(c.conns)]
}

// maxPiece is the largest read or write request the client sends.
func (c *Client) maxPiece() int64 {
	p := min(c.maxBlock, 4<<20)
	return max(p/c.minBlock*c.minBlock, c.minBlock)
}

// ReadAt implements block.Device. A large read is split into requests sent
// at once (over several connections when there are several).
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	n, eof := block.ShortRead(p, off, c.size)
	if n == 0 {
		return 0, eof
	}
	p = p[:n]
	if mb := c.minBlock; mb > 1 && (off%mb != 0 || int64(n)%mb != 0) {
		// Read the aligned range around p and copy out.
		start := off / mb * mb
		end := min((off+int64(n)+mb-1)/mb*mb, c.size)
		tmp := make([]byte, end-start)
		if err := c.readAligned(tmp, start); err != nil {
			return 0, err
		}
		copy(p, tmp[off-start:])
		return n, eof
	}
	if err := c.readAligned(p, off); err != nil {
		return 0, err
	}
	return n, eof
}

func (c *Client) readAligned(p []byte, off int64) error {
	return c.split(CmdRead, off, int64(len(p)), c.maxPiece(), func(cl *call, pos, k int64) []byte {
		cl.buf = p[pos : pos+k]
		return nil
	})
}

// split issues one command over [off, off+length) as pipelined requests of
// at most piece bytes, spread over the connections, and waits for them all;
// it returns the first error. payload sets up each request (a read buffer)
// and returns the bytes it sends (a write), or nil.
func (c *Client) split(typ uint16, off, length, piece int64, payload func(cl *call, pos, k int64) []byte) error {
	var calls []*call
	var first error
	for pos := int64(0); pos < length; pos += piece {
		k := min(piece, length-pos)
		cl := &call{typ: typ, off: uint64(off + pos), length: uint32(k)}
		if err := c.pick().start(context.Background(), cl, 0, payload(cl, pos, k)); err != nil {
			first = err
			break
		}
		calls = append(calls, cl)
	}
	for _, cl := range calls {
		if err := cl.wait(context.Background()); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Extents implements block.Device from base:allocation when the server
// offers it; otherwise everything is Data.
func (c *Client) Extents(ctx context.Context, off, length int64) ([]block.Extent, error) {
	off, length = block.ClipRange(c.size, off, length)
	if length == 0 {
		return nil, nil
	}
	if !slices.Contains(c.contexts, ContextBaseAllocation) {
		return block.Whole(c.size, off, length, block.Data), nil
	}
	sts, err := c.BlockStatus(ctx, ContextBaseAllocation, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]block.Extent, 0, len(sts))
	for _, s := range sts {
		t := block.Data
		switch {
		case s.Flags&(StateHole|StateZero) == StateHole|StateZero:
			t = block.Hole
		case s.Flags&StateZero != 0:
			t = block.Zero
		}
		// A hole without the zero flag reads as undefined bytes: Data.
		out = block.Append(out, block.Extent{Off: s.Off, Len: s.Len, Type: t})
	}
	return out, nil
}

// BlockStatus returns the descriptors of a metadata context (for example
// "base:allocation" or "qemu:dirty-bitmap:b0") covering [off, off+length)
// clipped to the export size, exactly and in order; adjacent descriptors
// with equal flags are merged. A context not negotiated at Dial (see
// ClientOptions.MetaContexts) is negotiated on an extra connection opened
// for it, which a server serving one client at a time (qemu-nbd without
// -e) refuses.
func (c *Client) BlockStatus(ctx context.Context, name string, off, length int64) ([]Status, error) {
	cc, err := c.connFor(ctx, name)
	if err != nil {
		return nil, err
	}
	id := cc.ctxID[name]
	off, length = block.ClipRange(c.size, off, length)
	end := off + length
	var out []Status
	for pos := off; pos < end; {
		k := min(end-pos, 1<<31)
		cl := &call{typ: CmdBlockStatus, off: uint64(pos), length: uint32(k)}
		if err := cc.start(ctx, cl, 0, nil); err != nil {
			return nil, err
		}
		if err := cl.wait(ctx); err != nil {
			return nil, err
		}
		descs := cl.status[id]
		if len(descs) == 0 {
			return nil, fmt.Errorf("nbd %s: block status at %d: no descriptors for context %q", c.target, pos, name)
		}
		for _, d := range descs {
			l := min(int64(d.len), end-pos)
			if l <= 0 {
				break
			}
			if n := len(out); n > 0 && out[n-1].Flags == d.flags {
				out[n-1].Len += l
			} else {
				out = append(out, Status{Off: pos, Len: l, Flags: d.flags})
			}
			pos += l
		}
	}
	return out, nil
}

// connFor returns a connection on which the context is negotiated.
func (c *Client) connFor(ctx context.Context, name string) (*clientConn, error) {
	if slices.Contains(c.contexts, name) {
		return c.pick(), nil
	}
	if !c.structured {
		return nil, fmt.Errorf("nbd %s: server has no structured replies, so no metadata context %q", c.target, name)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, net.ErrClosed
	}
	if cc := c.side[name]; cc != nil {
		return cc, nil
	}
	// A server serving one client at a time never greets a second
	// connection; do not wait long for it.
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	cc, err := c.dial(dctx, []string{name})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("metadata context %q needs a connection of its own (pass it in ClientOptions.MetaContexts to negotiate it at Dial): %w", name, err)
	}
	if _, ok := cc.ctxID[name]; !ok {
		cc.close()
		return nil, fmt.Errorf("nbd %s: server does not offer metadata context %q", c.target, name)
	}
	c.side[name] = cc
	return cc, nil
}

func (c *Client) checkWrite(off, n int64) error {
	if c.ReadOnly() {
		return fmt.Errorf("nbd %s: export is read-only", c.target)
	}
	if off < 0 || n < 0 || off+n > c.size {
		return fmt.Errorf("nbd %s: write [%d,+%d) outside the export size %d", c.target, off, n, c.size)
	}
	if mb := c.minBlock; mb > 1 && (off%mb != 0 || n%mb != 0) {
		return fmt.Errorf("nbd %s: write [%d,+%d) not aligned to the server's block size %d", c.target, off, n, mb)
	}
	return nil
}

// WriteAt implements block.Writer.
func (c *Client) WriteAt(p []byte, off int64) (int, error) {
	if err := c.checkWrite(off, int64(len(p))); err != nil {
		return 0, err
	}
	err := c.split(CmdWrite, off, int64(len(p)), c.maxPiece(), func(_ *call, pos, k int64) []byte { return p[pos : pos+k] })
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Zero implements block.Writer: WRITE_ZEROES (which may punch holes) when
// the server has it, else writes of zeros.
func (c *Client) Zero(off, length int64) error {
	if err := c.checkWrite(off, length); err != nil {
		return err
	}
	if c.flags&FlagSendWriteZeroes == 0 {
		for pos := off; pos < off+length; pos += readChunk {
			if _, err := c.WriteAt(zeroes[:min(readChunk, off+length-pos)], pos); err != nil {
				return err
			}
		}
		return nil
	}
	return c.split(CmdWriteZeroes, off, length, 1<<30, func(*call, int64, int64) []byte { return nil })
}

// Trim implements block.Writable. NBD's TRIM leaves contents undefined, and
// this project promises zeros after Trim, so it is a Zero.
func (c *Client) Trim(off, length int64) error { return c.Zero(off, length) }

// Flush implements block.Writer. With multi-conn one flush covers every
// connection; without it there is only one.
func (c *Client) Flush() error {
	if c.flags&FlagSendFlush == 0 {
		return nil
	}
	cl := &call{typ: CmdFlush}
	if err := c.conns[0].start(context.Background(), cl, 0, nil); err != nil {
		return err
	}
	return cl.wait(context.Background())
}

// Close implements block.Device: it disconnects every connection.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	side := c.side
	c.side = nil
	c.mu.Unlock()
	for _, cc := range c.conns {
		cc.close()
	}
	for _, cc := range side {
		cc.close()
	}
	return nil
}

// clientConn is one connection: a writer side shared by callers and a
// reader goroutine that dispatches replies by handle.
type clientConn struct {
	target Target
	nc     net.Conn
	r      *bufio.Reader

	size       int64
	flags      uint16
	minBlock   int64
	maxBlock   int64
	structured bool
	ctxID      map[string]uint32

	wmu     sync.Mutex
	mu      sync.Mutex
	pending map[uint64]*call
	handle  uint64
	err     error
	dead    chan struct{}
	slots   chan struct{}
	exited  chan struct{}
}

// call is one request in flight.
type call struct {
	typ    uint16
	off    uint64
	length uint32
	buf    []byte            // READ destination
	pieces [][2]uint64       // READ ranges covered by chunks
	status map[uint32][]desc // BLOCK_STATUS descriptors by context id
	err    error
	done   chan struct{}
}

type desc struct {
	len   uint32
	flags uint32
}

func (cl *call) wait(ctx context.Context) error {
	select {
	case <-cl.done:
		return cl.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (cl *call) fail(err error) {
	if cl.err == nil {
		cl.err = err
	}
}

func (c *Client) dial(ctx context.Context, contexts []string) (*clientConn, error) {
	t := c.target
	nc, err := c.opts.Dialer(ctx, t.Network, t.Address)
	if err != nil {
		return nil, fmt.Errorf("nbd %s: %w", t, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	nc.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	cc := &clientConn{target: t, nc: nc, r: bufio.NewReaderSize(nc, 256<<10), ctxID: map[string]uint32{}}
	err = cc.handshake(ctx, c.tls, contexts, !c.opts.NoStructuredReplies)
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		cc.nc.Close()
		return nil, fmt.Errorf("nbd %s: %w", t, err)
	}
	cc.nc.SetDeadline(time.Time{})
	cc.pending = map[uint64]*call{}
	cc.dead = make(chan struct{})
	cc.exited = make(chan struct{})
	cc.slots = make(chan struct{}, c.opts.InFlight)
	go cc.readLoop()
	return cc, nil
}

func (cc *clientConn) handshake(ctx context.Context, tlsCfg *tls.Config, contexts []string, wantStructured bool) error {
	var b [18]byte
	if _, err := io.ReadFull(cc.r, b[:]); err != nil {
		return fmt.Errorf("reading greeting: %w", err)
	}
	if m := binary.BigEndian.Uint64(b[0:]); m != magicNBD {
		return fmt.Errorf("not an NBD server (greeting 0x%x)", m)
	}
	switch m := binary.BigEndian.Uint64(b[8:]); m {
	case magicOpt:
	case magicOldstyle:
		return errors.New("oldstyle NBD servers are not supported")
	default:
		return fmt.Errorf("bad NBD greeting magic 0x%x", m)
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	fixed := hflags&flagFixedNewstyle != 0
	noZeroes := hflags&flagNoZeroes != 0
	var cflags uint32
	if fixed {
		cflags |= flagFixedNewstyle
	}
	if noZeroes {
		cflags |= flagNoZeroes
	}
	if _, err := cc.nc.Write(binary.BigEndian.AppendUint32(nil, cflags)); err != nil {
		return err
	}
	if !fixed {
		if tlsCfg != nil {
			return errors.New("server does not speak fixed newstyle, so it cannot do TLS")
		}
		return cc.exportName(noZeroes)
	}
	if tlsCfg != nil {
		typ, data, err := cc.option(OptStartTLS, nil)
		if err != nil {
			return err
		}
		if typ != RepAck {
			return fmt.Errorf("TLS refused: %w", optionError(OptStartTLS, typ, data))
		}
		tc := tls.Client(cc.nc, tlsCfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fmt.Errorf("TLS handshake: %w", err)
		}
		cc.nc, cc.r = tc, bufio.NewReaderSize(tc, 256<<10)
	}
	if wantStructured {
		typ, _, err := cc.option(OptStructuredReply, nil)
		if err != nil {
			return err
		}
		cc.structured = typ == RepAck
	}
	if cc.structured && len(contexts) > 0 {
		p := binary.BigEndian.AppendUint32(nil, uint32(len(cc.target.Export)))
		p = append(p, cc.target.Export...)
		p = binary.BigEndian.AppendUint32(p, uint32(len(contexts)))
		for _, m := range contexts {
			p = binary.BigEndian.AppendUint32(p, uint32(len(m)))
			p = append(p, m...)
		}
		if err := cc.sendOption(OptSetMetaContext, p); err != nil {
			return err
		}
		for {
			typ, data, err := cc.optReply(OptSetMetaContext)
			if err != nil {
				return err
			}
			if typ == RepMetaContext && len(data) >= 4 {
				cc.ctxID[string(data[4:])] = binary.BigEndian.Uint32(data)
				continue
			}
			if typ != RepAck {
				clear(cc.ctxID) // no contexts; block status falls back
			}
			break
		}
	}
	p := binary.BigEndian.AppendUint32(nil, uint32(len(cc.target.Export)))
	p = append(p, cc.target.Export...)
	p = binary.BigEndian.AppendUint16(p, 1)
	p = binary.BigEndian.AppendUint16(p, InfoBlockSize)
	if err := cc.sendOption(OptGo, p); err != nil {
		return err
	}
	cc.minBlock, cc.maxBlock = 1, MaxRequest
	gotExport := false
	for {
		typ, data, err := cc.optReply(OptGo)
		if err != nil {
			return err
		}
		switch {
		case typ == RepInfo && len(data) >= 2:
			switch binary.BigEndian.Uint16(data) {
			case InfoExport:
				if len(data) != 12 {
					return fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(data))
				}
				cc.size = int64(binary.BigEndian.Uint64(data[2:]))
				cc.flags = binary.BigEndian.Uint16(data[10:])
				gotExport = true
			case InfoBlockSize:
				if len(data) != 14 {
					return fmt.Errorf("NBD_INFO_BLOCK_SIZE of %d bytes", len(data))
				}
				minB, maxB := binary.BigEndian.Uint32(data[2:]), binary.BigEndian.Uint32(data[10:])
				if minB == 0 || minB > 64<<10 || minB&(minB-1) != 0 || maxB < minB {
					return fmt.Errorf("server block sizes min %d max %d make no sense", minB, maxB)
				}
				cc.minBlock, cc.maxBlock = int64(minB), min(int64(maxB), MaxRequest)
			}
		case typ == RepAck:
			if !gotExport {
				return errors.New("server accepted NBD_OPT_GO without NBD_INFO_EXPORT")
			}
			return cc.checkSize()
		case typ == RepErrUnsup:
			return cc.exportName(noZeroes)
		case typ&repErr != 0:
			return fmt.Errorf("export %q: %w", cc.target.Export, optionError(OptGo, typ, data))
		}
	}
}

func (cc *clientConn) checkSize() error {
	if cc.size < 0 {
		return fmt.Errorf("export size %d does not fit in 63 bits", uint64(cc.size))
	}
	return nil
}

// exportName ends the handshake the old way (no error reporting).
func (cc *clientConn) exportName(noZeroes bool) error {
	if err := cc.sendOption(OptExportName, []byte(cc.target.Export)); err != nil {
		return err
	}
	var b [10 + 124]byte
	n := len(b)
	if noZeroes {
		n = 10
	}
	if _, err := io.ReadFull(cc.r, b[:n]); err != nil {
		return fmt.Errorf("server refused export %q (connection closed): %w", cc.target.Export, err)
	}
	cc.size = int64(binary.BigEndian.Uint64(b[0:]))
	cc.flags = binary.BigEndian.Uint16(b[8:])
	cc.minBlock, cc.maxBlock = 1, MaxRequest
	// Structured replies and metadata contexts negotiated before still
	// hold: they were options of their own, for this export name.
	return cc.checkSize()
}

func (cc *clientConn) sendOption(opt uint32, data []byte) error {
	b := make([]byte, 16, 16+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOpt)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], uint32(len(data)))
	_, err := cc.nc.Write(append(b, data...))
	return err
}

// option sends an option with a single reply and returns that reply.
func (cc *clientConn) option(opt uint32, data []byte) (uint32, []byte, error) {
	if err := cc.sendOption(opt, data); err != nil {
		return 0, nil, err
	}
	return cc.optReply(opt)
}

func (cc *clientConn) optReply(opt uint32) (uint32, []byte, error) {
	var h [20]byte
	if _, err := io.ReadFull(cc.r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("reading reply to option %d: %w", opt, err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOptReply {
		return 0, nil, fmt.Errorf("bad option reply magic 0x%x", m)
	}
	if o := binary.BigEndian.Uint32(h[8:]); o != opt {
		return 0, nil, fmt.Errorf("reply to option %d while waiting for option %d", o, opt)
	}
	typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
	if n > maxOption {
		return 0, nil, fmt.Errorf("option %d reply of %d bytes is too long", opt, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(cc.r, data); err != nil {
		return 0, nil, fmt.Errorf("reading reply to option %d: %w", opt, err)
	}
	return typ, data, nil
}

func optionError(opt, typ uint32, data []byte) error {
	return &OptionError{Option: opt, Reply: typ, Msg: string(data[:min(len(data), maxString)])}
}

// start sends a request; its reply completes cl. payload is a WRITE's data.
// An error means the request was not sent.
func (cc *clientConn) start(ctx context.Context, cl *call, flags uint16, payload []byte) error {
	cl.done = make(chan struct{})
	select {
	case cc.slots <- struct{}{}:
	case <-cc.dead:
		return cc.deadErr()
	case <-ctx.Done():
		return ctx.Err()
	}
	cc.mu.Lock()
	if cc.err != nil {
		cc.mu.Unlock()
		<-cc.slots
		return cc.err
	}
	cc.handle++
	h := cc.handle
	cc.pending[h] = cl
	cc.mu.Unlock()
	var hdr [requestHdr]byte
	binary.BigEndian.PutUint32(hdr[0:], magicRequest)
	binary.BigEndian.PutUint16(hdr[4:], flags)
	binary.BigEndian.PutUint16(hdr[6:], cl.typ)
	binary.BigEndian.PutUint64(hdr[8:], h)
	binary.BigEndian.PutUint64(hdr[16:], cl.off)
	binary.BigEndian.PutUint32(hdr[24:], cl.length)
	cc.wmu.Lock()
	var err error
	if payload != nil {
		bufs := net.Buffers{hdr[:], payload}
		_, err = bufs.WriteTo(cc.nc)
	} else {
		_, err = cc.nc.Write(hdr[:])
	}
	cc.wmu.Unlock()
	if err != nil {
		// The reader sees the closed connection and completes cl.
		cc.broken(fmt.Errorf("nbd %s: sending %s: %w", cc.target, cmdNames[cl.typ], err))
	}
	return nil
}

func (cc *clientConn) deadErr() error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.err
}

// broken marks the connection failed and closes it. Only the reader
// goroutine completes calls, so no buffer is written after its call returned.
func (cc *clientConn) broken(err error) {
	cc.mu.Lock()
	first := cc.err == nil
	if first {
		cc.err = err
		close(cc.dead)
	}
	cc.mu.Unlock()
	if first {
		cc.nc.Close()
	}
}

func (cc *clientConn) close() {
	cc.mu.Lock()
	idle := cc.err == nil && len(cc.pending) == 0
	cc.mu.Unlock()
	if idle {
		// Soft disconnect: NBD_CMD_DISC has no reply.
		var hdr [requestHdr]byte
		binary.BigEndian.PutUint32(hdr[0:], magicRequest)
		binary.BigEndian.PutUint16(hdr[6:], CmdDisc)
		cc.wmu.Lock()
		cc.nc.SetWriteDeadline(time.Now().Add(time.Second))
		cc.nc.Write(hdr[:])
		cc.wmu.Unlock()
	}
	cc.broken(net.ErrClosed)
	<-cc.exited
}

func (cc *clientConn) readLoop() {
	defer close(cc.exited)
	err := cc.readReplies()
	cc.broken(fmt.Errorf("nbd %s: %w", cc.target, err))
	cc.mu.Lock()
	err = cc.err
	pending := cc.pending
	cc.pending = map[uint64]*call{}
	cc.mu.Unlock()
	for _, cl := range pending {
		cl.fail(err)
		close(cl.done)
		<-cc.slots
	}
}

// finish completes a call (the reader owns it until then).
func (cc *clientConn) finish(h uint64, cl *call) {
	cc.mu.Lock()
	delete(cc.pending, h)
	cc.mu.Unlock()
	if cl.typ == CmdRead && cl.err == nil {
		cl.err = cl.checkCoverage()
	}
	close(cl.done)
	<-cc.slots
}

// checkCoverage verifies the chunks of a structured READ cover it exactly.
func (cl *call) checkCoverage() error {
	if cl.pieces == nil {
		return nil // simple reply
	}
	slices.SortFunc(cl.pieces, func(a, b [2]uint64) int { return cmp.Compare(a[0], b[0]) })
	pos := cl.off
	for _, p := range cl.pieces {
		if p[0] != pos {
			return fmt.Errorf("nbd READ [%d,+%d): server's chunks leave a gap or overlap at %d", cl.off, cl.length, pos)
		}
		pos += p[1]
	}
	if pos != cl.off+uint64(cl.length) {
		return fmt.Errorf("nbd READ [%d,+%d): server's chunks end at %d", cl.off, cl.length, pos)
	}
	return nil
}

func (cc *clientConn) lookup(h uint64) (*call, error) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	cl := cc.pending[h]
	if cl == nil {
		return nil, fmt.Errorf("reply for unknown handle %d", h)
	}
	return cl, nil
}

func (cc *clientConn) readReplies() error {
	var h [chunkHdr]byte
	for {
		if _, err := io.ReadFull(cc.r, h[:4]); err != nil {
			return err
		}
		switch m := binary.BigEndian.Uint32(h[:]); m {
		case magicSimpleReply:
			if _, err := io.ReadFull(cc.r, h[4:simpleHdr]); err != nil {
				return err
			}
			code, handle := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
			cl, err := cc.lookup(handle)
			if err != nil {
				return err
			}
			switch {
			case code != 0:
				cl.fail(&Error{Cmd: cmdNames[cl.typ], Off: int64(cl.off), Len: int64(cl.length), Code: code})
			case cl.typ == CmdRead && cc.structured:
				return errors.New("simple reply to READ after structured replies were negotiated")
			case cl.typ == CmdRead:
				if _, err := io.ReadFull(cc.r, cl.buf); err != nil {
					return err
				}
			}
			cc.finish(handle, cl)
		case magicStructuredReply:
			if !cc.structured {
				return errors.New("structured reply that was not negotiated")
			}
			if _, err := io.ReadFull(cc.r, h[4:chunkHdr]); err != nil {
				return err
			}
			flags, typ := binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:])
			handle, n := binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[16:])
			cl, err := cc.lookup(handle)
			if err != nil {
				return err
			}
			if err := cc.chunk(cl, typ, n); err != nil {
				return err
			}
			if flags&replyFlagDone != 0 {
				cc.finish(handle, cl)
			}
		default:
			return fmt.Errorf("bad reply magic 0x%x", m)
		}
	}
}

// chunk reads the payload of one structured reply chunk into its call.
func (cc *clientConn) chunk(cl *call, typ uint16, n uint32) error {
	var b [12]byte
	switch {
	case typ == ReplyTypeNone:
		if n != 0 {
			return fmt.Errorf("NONE chunk with %d bytes", n)
		}
	case typ == ReplyTypeOffsetData || typ == ReplyTypeOffsetHole:
		if cl.typ != CmdRead {
			return fmt.Errorf("content chunk in reply to %s", cmdNames[cl.typ])
		}
		if typ == ReplyTypeOffsetData && n < 9 || typ == ReplyTypeOffsetHole && n != 12 {
			return fmt.Errorf("content chunk type %d of %d bytes", typ, n)
		}
		if _, err := io.ReadFull(cc.r, b[:8]); err != nil {
			return err
		}
		off := binary.BigEndian.Uint64(b[:])
		size := uint64(n - 8)
		if typ == ReplyTypeOffsetHole {
			if _, err := io.ReadFull(cc.r, b[8:12]); err != nil {
				return err
			}
			size = uint64(binary.BigEndian.Uint32(b[8:]))
		}
		if size == 0 || off < cl.off || off+size > cl.off+uint64(cl.length) || off+size < off {
			return fmt.Errorf("chunk [%d,+%d) outside READ [%d,+%d)", off, size, cl.off, cl.length)
		}
		dst := cl.buf[off-cl.off : off-cl.off+size]
		if typ == ReplyTypeOffsetData {
			if _, err := io.ReadFull(cc.r, dst); err != nil {
				return err
			}
		} else {
			clear(dst)
		}
		cl.pieces = append(cl.pieces, [2]uint64{off, size})
		if len(cl.pieces) > 1<<20 {
			return errors.New("too many chunks in one READ reply")
		}
	case typ == ReplyTypeBlockStatus:
		if cl.typ != CmdBlockStatus {
			return fmt.Errorf("block status chunk in reply to %s", cmdNames[cl.typ])
		}
		if n < 12 || (n-4)%8 != 0 || n > 64<<20 {
			return fmt.Errorf("block status chunk of %d bytes", n)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(cc.r, p); err != nil {
			return err
		}
		id := binary.BigEndian.Uint32(p)
		ds := make([]desc, 0, (n-4)/8)
		for i := 4; i < len(p); i += 8 {
			d := desc{len: binary.BigEndian.Uint32(p[i:]), flags: binary.BigEndian.Uint32(p[i+4:])}
			if d.len == 0 {
				return errors.New("block status descriptor of length 0")
			}
			ds = append(ds, d)
		}
		if cl.status == nil {
			cl.status = map[uint32][]desc{}
		}
		cl.status[id] = ds
	case typ&replyTypeErrBit != 0:
		if n < 6 || n > 1<<20 {
			return fmt.Errorf("error chunk of %d bytes", n)
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(cc.r, p); err != nil {
			return err
		}
		code, ml := binary.BigEndian.Uint32(p), int(binary.BigEndian.Uint16(p[4:]))
		if ml > len(p)-6 {
			return fmt.Errorf("error chunk message of %d bytes in %d", ml, n)
		}
		if code == 0 {
			code = EIO
		}
		e := &Error{Cmd: cmdNames[cl.typ], Off: int64(cl.off), Len: int64(cl.length), Code: code, Msg: string(p[6 : 6+ml])}
		if typ == ReplyTypeErrorOffset && len(p) >= 6+ml+8 {
			e.Off = int64(binary.BigEndian.Uint64(p[6+ml:]))
		}
		cl.fail(e)
	default:
		return fmt.Errorf("unknown structured reply type %d", typ)
	}
	return nil
}
