// Package testpeers starts the real servers tests talk to, in the test's
// temporary folder, and stops them in t.Cleanup: OpenSSH's sshd on
// 127.0.0.1 with generated keys, govmomi's vSphere simulator with a
// datastore mapped to a local folder, and an HTTP proxy that injects faults
// (resets, 5xx, ignored ranges, slowness, truncated bodies) between a client
// and a real server. Nothing here fakes the thing under test; it only sets up
// real peers and, for faults, misbehaves on purpose in front of them.
package testpeers

import (
	"net"
	"strconv"
	"testing"
)

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
