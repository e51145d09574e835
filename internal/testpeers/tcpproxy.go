package testpeers

import (
	"io"
	"net"
	"sync"
	"testing"
)

// TCPProxy forwards TCP connections to an upstream address and can cut them
// all at once, as a network failure or a host dropping sessions would.
type TCPProxy struct {
	Addr     string // 127.0.0.1:PORT to connect to instead of upstream
	upstream string
	l        net.Listener

	mu    sync.Mutex
	conns []net.Conn
	cuts  int
}

// StartTCPProxy listens on 127.0.0.1 and forwards to upstream until the
// test ends.
func StartTCPProxy(t testing.TB, upstream string) *TCPProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &TCPProxy{Addr: l.Addr().String(), upstream: upstream, l: l}
	t.Cleanup(func() { l.Close(); p.Cut() })
	go p.accept()
	return p
}

func (p *TCPProxy) accept() {
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", p.upstream)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		go func() { io.Copy(u, c); u.Close() }()
		go func() { io.Copy(c, u); c.Close() }()
	}
}

// Cut resets every connection open now; new ones are still accepted.
func (p *TCPProxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
	p.conns = nil
	p.cuts++
}
