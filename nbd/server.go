package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// Export is one named device a Server offers.
type Export struct {
	Name        string
	Description string
	Device      block.Device
	// Writable exports accept writes; Device must then be a block.Writable.
	// A server never writes into a device it was not told is writable.
	Writable bool

	cache *extCache // read-only exports: extents of recent windows
}

// ServerOptions tune a Server. The zero value serves plaintext only.
type ServerOptions struct {
	// TLS enables NBD_OPT_STARTTLS with this configuration.
	TLS *tls.Config
	// RequireTLS refuses every option but STARTTLS and ABORT until TLS is
	// up (the spec's FORCEDTLS mode). It needs TLS.
	RequireTLS bool
	// Logger receives per-connection diagnostics (default: discarded).
	Logger *slog.Logger
	// ConnMemory bounds the request buffers one connection holds at once
	// (default 64 MiB). A client that sends faster than it reads waits.
	ConnMemory int64
	// Memory bounds the request buffers of all connections (default 256 MiB).
	Memory int64
	// HandshakeTimeout bounds option haggling (default 30 s).
	HandshakeTimeout time.Duration
	// WriteTimeout drops a client that accepts no reply bytes for this long
	// (default 2 min).
	WriteTimeout time.Duration
	// Workers is how many requests of one connection are served at once
	// (default 16); more wait in the socket.
	Workers int
	// PayloadTimeout drops a client whose WRITE payload does not arrive in
	// this time after its header (default 1 min), so a stalled client
	// cannot hold request memory forever.
	PayloadTimeout time.Duration
}

// Server exports devices over NBD. It is safe for concurrent use; one Server
// may serve several listeners.
type Server struct {
	opts    ServerOptions
	log     *slog.Logger
	exports map[string]*Export
	names   []string
	mem     *semaphore.Weighted
	pools   bufPools
	wg      sync.WaitGroup
}

const (
	readChunk  = 1 << 20  // largest OFFSET_DATA chunk the server sends
	minWeight  = 64 << 10 // memory charged per request, whatever its size
	chunkHdr   = 20       // structured reply chunk header
	dataHdr    = chunkHdr + 8
	simpleHdr  = 16
	requestHdr = 28
	maxDescs   = 1 << 16 // block status descriptors per reply
)

// NewServer returns a server for the given exports. Names must be unique;
// the empty name is the default export.
func NewServer(opts ServerOptions, exports ...Export) (*Server, error) {
	if opts.RequireTLS && opts.TLS == nil {
		return nil, errors.New("nbd server: TLS required but no TLS configuration given")
	}
	if opts.ConnMemory <= 0 {
		opts.ConnMemory = 64 << 20
	}
	if opts.Memory <= 0 {
		opts.Memory = 256 << 20
	}
	opts.ConnMemory = max(opts.ConnMemory, MaxRequest+minWeight)
	opts.Memory = max(opts.Memory, opts.ConnMemory)
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 30 * time.Second
	}
	if opts.Workers <= 0 {
		opts.Workers = 16
	}
	if opts.PayloadTimeout <= 0 {
		opts.PayloadTimeout = time.Minute
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 2 * time.Minute
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Server{opts: opts, log: log, exports: map[string]*Export{}, mem: semaphore.NewWeighted(opts.Memory)}
	for i := range exports {
		e := exports[i]
		if _, dup := s.exports[e.Name]; dup {
			return nil, fmt.Errorf("nbd server: export %q given twice", e.Name)
		}
		if len(e.Name) > maxString || len(e.Description) > maxString {
			return nil, fmt.Errorf("nbd server: export %q: name or description longer than %d bytes", e.Name, maxString)
		}
		if e.Device == nil {
			return nil, fmt.Errorf("nbd server: export %q has no device", e.Name)
		}
		if _, ok := e.Device.(block.Writable); e.Writable && !ok {
			return nil, fmt.Errorf("nbd server: export %q is writable but its device cannot be written", e.Name)
		}
		if !e.Writable {
			e.cache = newExtCache(e.Device)
		}
		s.exports[e.Name] = &e
		s.names = append(s.names, e.Name)
	}
	sort.Strings(s.names)
	return s, nil
}

// Serve accepts connections on ln until ctx is cancelled (then it closes ln,
// drops every connection after its in-flight requests, and returns nil) or
// Accept fails.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	defer s.wg.Wait()
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd server: accept: %w", err)
			}
			// Out of file descriptors and the like: wait for clients to
			// leave rather than stop serving the ones connected.
			s.log.Warn("nbd server: accept failed; retrying", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if err := s.ServeConn(ctx, nc); err != nil {
				s.log.Debug("nbd connection ended", "remote", nc.RemoteAddr(), "err", err)
			}
		}()
	}
}

// ServeConn speaks NBD on one accepted connection until the client leaves,
// breaks the protocol, or ctx is cancelled. It closes nc.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) error {
	defer nc.Close()
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	if wb, ok := nc.(interface{ SetWriteBuffer(int) error }); ok {
		// Room for a few whole replies, so a 256 KiB READ reply rarely
		// needs a second write after waiting for the client (the kernel
		// clamps this to net.core.wmem_max).
		wb.SetWriteBuffer(2 << 20)
	}
	c := &serverConn{s: s, nc: nc, r: bufio.NewReaderSize(nc, 64<<10)}
	nc.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	exp, err := c.handshake()
	if err != nil || exp == nil {
		return err
	}
	nc.SetDeadline(time.Time{})
	return c.transmit(ctx, exp)
}

// serverConn is the state of one client connection.
type serverConn struct {
	s  *Server
	nc net.Conn // replaced by the TLS connection after STARTTLS
	r  *bufio.Reader

	tls        bool
	noZeroes   bool
	structured bool
	metaExport string // export the selected contexts belong to
	metaBase   bool   // base:allocation selected

	// transmission phase
	exp     *Export
	dev     block.Device
	wdev    block.Writable
	flags   uint16
	baseCtx bool
	fm      block.FileMapper // the device's file, for sendfile; nil when not usable
	rc      syscall.RawConn  // the socket, for sendfile
	wmu     sync.Mutex
	dead    atomic.Bool
	ctx     context.Context
	connMem *semaphore.Weighted
}

const baseAllocationID = 1

var errAbort = errors.New("client aborted the handshake")

func (c *serverConn) handshake() (*Export, error) {
	var b [18]byte
	binary.BigEndian.PutUint64(b[0:], magicNBD)
	binary.BigEndian.PutUint64(b[8:], magicOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.nc.Write(b[:]); err != nil {
		return nil, err
	}
	if _, err := io.ReadFull(c.r, b[:4]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return nil, fmt.Errorf("unknown client flags 0x%x", cflags)
	}
	c.noZeroes = cflags&flagNoZeroes != 0
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return nil, fmt.Errorf("reading option: %w", err)
		}
		if m := binary.BigEndian.Uint64(hdr[0:]); m != magicOpt {
			return nil, fmt.Errorf("bad option magic 0x%x", m)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		n := binary.BigEndian.Uint32(hdr[12:])
		if n > maxOption {
			// Skipping it would let a client make us read gigabytes; the
			// spec allows a hard disconnect for a denial of service.
			c.optReply(opt, RepErrTooBig, []byte(fmt.Sprintf("option data of %d bytes exceeds %d", n, maxOption)))
			return nil, fmt.Errorf("option %d: %d bytes of data exceed %d", opt, n, maxOption)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return nil, fmt.Errorf("reading option %d data: %w", opt, err)
		}
		exp, err := c.option(opt, data)
		if err != nil || exp != nil {
			return exp, err
		}
	}
}

// option handles one option. It returns the export when transmission starts.
func (c *serverConn) option(opt uint32, data []byte) (*Export, error) {
	if c.s.opts.RequireTLS && !c.tls {
		switch opt {
		case OptExportName:
			return nil, errors.New("client chose an export by NBD_OPT_EXPORT_NAME without TLS, which this server requires")
		case OptStartTLS, OptAbort:
		default:
			return nil, c.optErr(opt, RepErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
		}
	}
	switch opt {
	case OptExportName:
		e := c.s.exports[string(data)]
		if e == nil {
			return nil, fmt.Errorf("client asked for unknown export %q", data)
		}
		c.exp = e
		var b [8 + 2 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(e.Device.Size()))
		binary.BigEndian.PutUint16(b[8:], c.exportFlags(e))
		out := b[:]
		if c.noZeroes {
			out = b[:10]
		}
		if _, err := c.nc.Write(out); err != nil {
			return nil, err
		}
		return e, nil
	case OptAbort:
		c.optReply(opt, RepAck, nil)
		return nil, errAbort
	case OptList:
		if len(data) != 0 {
			return nil, c.optErr(opt, RepErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, name := range c.s.names {
			e := c.s.exports[name]
			p := make([]byte, 4, 4+len(name)+len(e.Description))
			binary.BigEndian.PutUint32(p, uint32(len(name)))
			p = append(append(p, name...), e.Description...)
			if err := c.optReply(opt, RepServer, p); err != nil {
				return nil, err
			}
		}
		return nil, c.optReply(opt, RepAck, nil)
	case OptStartTLS:
		switch {
		case len(data) != 0:
			return nil, c.optErr(opt, RepErrInvalid, "NBD_OPT_STARTTLS takes no data")
		case c.s.opts.TLS == nil:
			return nil, c.optErr(opt, RepErrPolicy, "TLS is not configured on this server")
		case c.tls:
			return nil, c.optErr(opt, RepErrInvalid, "TLS is already active")
		}
		if err := c.optReply(opt, RepAck, nil); err != nil {
			return nil, err
		}
		if c.r.Buffered() > 0 {
			return nil, errors.New("client sent data after NBD_OPT_STARTTLS before the TLS handshake")
		}
		tc := tls.Server(c.nc, c.s.opts.TLS)
		if err := tc.Handshake(); err != nil {
			return nil, fmt.Errorf("TLS handshake: %w", err)
		}
		c.nc, c.r, c.tls = tc, bufio.NewReaderSize(tc, 64<<10), true
		// No negotiation state survives STARTTLS.
		c.structured, c.metaBase, c.metaExport = false, false, ""
		return nil, nil
	case OptInfo, OptGo:
		name, infos, ok := parseInfoRequest(data)
		if !ok {
			return nil, c.optErr(opt, RepErrInvalid, "malformed NBD_OPT_INFO/GO data")
		}
		e := c.s.exports[name]
		if e == nil {
			return nil, c.optErr(opt, RepErrUnknown, fmt.Sprintf("no export named %q", name))
		}
		var p [14]byte
		binary.BigEndian.PutUint16(p[0:], InfoExport)
		binary.BigEndian.PutUint64(p[2:], uint64(e.Device.Size()))
		binary.BigEndian.PutUint16(p[10:], c.exportFlags(e))
		if err := c.optReply(opt, RepInfo, p[:12]); err != nil {
			return nil, err
		}
		for _, it := range infos {
			var err error
			switch it {
			case InfoName:
				err = c.optReply(opt, RepInfo, append([]byte{0, InfoName}, e.Name...))
			case InfoDescription:
				if e.Description != "" {
					err = c.optReply(opt, RepInfo, append([]byte{0, InfoDescription}, e.Description...))
				}
			}
			if err != nil {
				return nil, err
			}
		}
		// Block sizes are sent whether asked or not: clients ignore what
		// they did not ask for, and we enforce nothing beyond the defaults
		// but the maximum.
		binary.BigEndian.PutUint16(p[0:], InfoBlockSize)
		binary.BigEndian.PutUint32(p[2:], 1)
		binary.BigEndian.PutUint32(p[6:], 4096)
		binary.BigEndian.PutUint32(p[10:], MaxRequest)
		if err := c.optReply(opt, RepInfo, p[:14]); err != nil {
			return nil, err
		}
		if err := c.optReply(opt, RepAck, nil); err != nil {
			return nil, err
		}
		if opt == OptInfo {
			return nil, nil
		}
		c.exp = e
		return e, nil
	case OptStructuredReply:
		if len(data) != 0 {
			return nil, c.optErr(opt, RepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		return nil, c.optReply(opt, RepAck, nil)
	case OptListMetaContext, OptSetMetaContext:
		if opt == OptSetMetaContext {
			c.metaBase, c.metaExport = false, ""
		}
		if !c.structured {
			return nil, c.optErr(opt, RepErrInvalid, "metadata contexts need structured replies first")
		}
		name, queries, ok := parseMetaRequest(data)
		if !ok {
			return nil, c.optErr(opt, RepErrInvalid, "malformed metadata context request")
		}
		if c.s.exports[name] == nil {
			return nil, c.optErr(opt, RepErrUnknown, fmt.Sprintf("no export named %q", name))
		}
		base := false
		for _, q := range queries {
			if q == ContextBaseAllocation || (opt == OptListMetaContext && q == "base:") {
				base = true
			}
		}
		if opt == OptListMetaContext && len(queries) == 0 {
			base = true
		}
		if base {
			p := binary.BigEndian.AppendUint32(nil, 0)
			if opt == OptSetMetaContext {
				p = binary.BigEndian.AppendUint32(p[:0], baseAllocationID)
				c.metaBase, c.metaExport = true, name
			}
			if err := c.optReply(opt, RepMetaContext, append(p, ContextBaseAllocation...)); err != nil {
				return nil, err
			}
		}
		return nil, c.optReply(opt, RepAck, nil)
	}
	return nil, c.optErr(opt, RepErrUnsup, fmt.Sprintf("option %d is not supported", opt))
}

// parseInfoRequest parses the data of NBD_OPT_INFO and NBD_OPT_GO.
func parseInfoRequest(data []byte) (name string, infos []uint16, ok bool) {
	if len(data) < 6 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n) > uint64(len(data)-6) || n > maxString {
		return "", nil, false
	}
	name = string(data[4 : 4+n])
	rest := data[4+n:]
	cnt := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*cnt {
		return "", nil, false
	}
	for i := 0; i < cnt; i++ {
		infos = append(infos, binary.BigEndian.Uint16(rest[2*i:]))
	}
	return name, infos, true
}

// parseMetaRequest parses the data of NBD_OPT_LIST/SET_META_CONTEXT.
func parseMetaRequest(data []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(data) < 4 {
			return "", false
		}
		n := binary.BigEndian.Uint32(data)
		if uint64(n) > uint64(len(data)-4) || n > maxString {
			return "", false
		}
		s := string(data[4 : 4+n])
		data = data[4+n:]
		return s, true
	}
	if name, ok = str(); !ok || len(data) < 4 {
		return "", nil, false
	}
	cnt := binary.BigEndian.Uint32(data)
	data = data[4:]
	if uint64(cnt) > uint64(len(data)/4) { // each query needs at least 4 bytes
		return "", nil, false
	}
	for i := uint32(0); i < cnt; i++ {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(data) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

func (c *serverConn) optReply(opt, typ uint32, data []byte) error {
	b := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(b[0:], magicOptReply)
	binary.BigEndian.PutUint32(b[8:], opt)
	binary.BigEndian.PutUint32(b[12:], typ)
	binary.BigEndian.PutUint32(b[16:], uint32(len(data)))
	_, err := c.nc.Write(append(b, data...))
	return err
}

// optErr sends an error reply; only a failure to send ends the handshake.
func (c *serverConn) optErr(opt, typ uint32, msg string) error {
	return c.optReply(opt, typ, []byte(msg))
}

func (c *serverConn) exportFlags(e *Export) uint16 {
	f := uint16(FlagHasFlags | FlagCanMultiConn | FlagSendCache)
	if c.structured {
		f |= FlagSendDF
	}
	if e.Writable {
		f |= FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero
	} else {
		f |= FlagReadOnly
	}
	return f
}
