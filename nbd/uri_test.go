package nbd_test

import (
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

func TestParseURI(t *testing.T) {
	for _, c := range []struct {
		in   string
		want nbd.Target
	}{
		{"nbd://example.com/disk", nbd.Target{Network: "tcp", Address: "example.com:10809", Export: "disk", TLSHostname: "example.com"}},
		{"nbd://10.0.0.1:1234", nbd.Target{Network: "tcp", Address: "10.0.0.1:1234", TLSHostname: "10.0.0.1"}},
		{"nbds://[::1]:99/a%20b", nbd.Target{Network: "tcp", Address: "[::1]:99", Export: "a b", TLS: true, TLSHostname: "::1"}},
		{"nbd+unix:///?socket=/run/s.sock", nbd.Target{Network: "unix", Address: "/run/s.sock"}},
		{"nbds+unix:///e?socket=/s&tls-certificates=/pki&tls-hostname=h&tls-verify-peer=false",
			nbd.Target{Network: "unix", Address: "/s", Export: "e", TLS: true, TLSCertificates: "/pki", TLSHostname: "h", TLSNoVerify: true}},
	} {
		got, err := nbd.ParseURI(c.in)
		if err != nil || got != c.want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", c.in, got, err, c.want)
			continue
		}
		// String renders a URI that parses back to the same target.
		again, err := nbd.ParseURI(got.String())
		if err != nil || again.Network != got.Network || again.Address != got.Address || again.Export != got.Export || again.TLS != got.TLS {
			t.Errorf("round trip of %q via %q: %+v, %v", c.in, got.String(), again, err)
		}
	}
	for _, bad := range []string{
		"http://x/y", "nbd+unix:///e", "nbd+unix://host/e?socket=/s", "nbd://user:pw@host/e", "nbd://h/?tls-verify-peer=maybe", "://",
	} {
		if _, err := nbd.ParseURI(bad); err == nil {
			t.Errorf("ParseURI(%q) succeeded", bad)
		}
	}
}
