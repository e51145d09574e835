package nbd_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// writePKI writes a CA, a server certificate (localhost, 127.0.0.1) and a
// client certificate into dir with the names nbdkit, qemu and libnbd use.
func writePKI(t testing.TB, dir string) {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	save := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	saveKey := func(name string, k *ecdsa.PrivateKey) {
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		save(name, "PRIVATE KEY", der)
	}
	now := time.Now()
	caKey := key()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "vmdk2kvm test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	save("ca-cert.pem", "CERTIFICATE", caDER)
	for i, role := range []string{"server", "client"} {
		k := key()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: role},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			DNSNames:    []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		save(role+"-cert.pem", "CERTIFICATE", der)
		saveKey(role+"-key.pem", k)
	}
}

func serverTLS(t testing.TB, dir string) *tls.Config {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	pem, _ := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
}

// TestTLS: our server requiring TLS with client certificates is read by
// nbdinfo and nbdcopy over TLS and refuses them in plaintext; our client
// speaks TLS to our server and to qemu-nbd.
func TestTLS(t *testing.T) {
	need(t, "nbdinfo", "nbdcopy", "qemu-nbd")
	pki := t.TempDir()
	writePKI(t, pki)
	dev := openFixture(t)
	sock, _ := serve(t, nbd.ServerOptions{TLS: serverTLS(t, pki), RequireTLS: true}, nbd.Export{Name: "d", Device: dev})
	tlsURI := "nbds+unix:///d?socket=" + sock + "&tls-certificates=" + pki

	out := run(t, "nbdinfo", "--size", tlsURI)
	if string(out) != "50331648\n" {
		t.Fatalf("nbdinfo over TLS: %q", out)
	}
	copyOut := filepath.Join(t.TempDir(), "copy.raw")
	run(t, "nbdcopy", tlsURI, copyOut)
	if fileSHA(t, copyOut) != fileSHA(t, fixture()) {
		t.Fatal("nbdcopy over TLS differs from the source")
	}
	if out, err := runErr("nbdinfo", "--size", unixURI(sock, "d")); err == nil {
		t.Fatalf("plaintext nbdinfo was served by a TLS-only server: %s", out)
	}

	c := dial(t, tlsURI, nbd.ClientOptions{})
	if deviceSHA(t, c) != fileSHA(t, fixture()) {
		t.Fatal("our client over TLS read different bytes")
	}
	// Without a client certificate the handshake fails.
	noCert := t.TempDir()
	ca, _ := os.ReadFile(filepath.Join(pki, "ca-cert.pem"))
	os.WriteFile(filepath.Join(noCert, "ca-cert.pem"), ca, 0o600)
	if _, err := nbd.Dial(context.Background(), "nbds+unix:///d?socket="+sock+"&tls-certificates="+noCert, nbd.ClientOptions{}); err == nil {
		t.Fatal("TLS without a client certificate was accepted")
	}
	// Plaintext from our client is refused with TLS_REQD.
	if _, err := nbd.Dial(context.Background(), unixURI(sock, "d"), nbd.ClientOptions{}); err == nil {
		t.Fatal("plaintext client accepted")
	}

	// qemu-nbd with x509 credentials, read by our client.
	qsock := filepath.Join(t.TempDir(), "q.sock")
	daemon(t, qsock, "qemu-nbd", "-f", "raw", "-r", "-t", "-e", "8", "-k", qsock,
		"--object", "tls-creds-x509,id=tls0,dir="+pki+",endpoint=server,verify-peer=on",
		"--tls-creds", "tls0", fixture())
	q := dial(t, "nbds+unix:///?socket="+qsock+"&tls-certificates="+pki, nbd.ClientOptions{})
	if deviceSHA(t, q) != fileSHA(t, fixture()) {
		t.Fatal("our client read different bytes from qemu-nbd over TLS")
	}
}
