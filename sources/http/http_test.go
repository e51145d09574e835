package http_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	nethttp "net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/filters"
	"github.com/vmdk2kvm/vmdk2kvm/internal/testpeers"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
	httpsrc "github.com/vmdk2kvm/vmdk2kvm/sources/http"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
	"github.com/vmdk2kvm/vmdk2kvm/sources/vmdk"
)

// fixture is one simulator with a datastore holding a random file, shared
// by the tests of this package (a simulator per test would cost seconds).
type fixture struct {
	sim    *testpeers.VCSim
	data   []byte
	name   string
	chains []testpeers.Chain
}

var (
	fixOnce sync.Once
	fix     *fixture
	fixDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if fixDir != "" {
		os.RemoveAll(fixDir)
	}
	os.Exit(code)
}

// shared returns the package fixture; the simulator lives until the process
// ends (its cleanup is registered on the first test that asked, so that
// test's end would stop it: we keep it on a long-lived holder instead).
func shared(t *testing.T) *fixture {
	fixOnce.Do(func() {
		var err error
		fixDir, err = os.MkdirTemp("", "httpsrc-test-")
		if err != nil {
			t.Fatal(err)
		}
		f := &fixture{name: "vm/disk-flat.vmdk"}
		f.data = make([]byte, 5<<20+12345)
		r := rand.New(rand.NewPCG(1, 2))
		for i := range f.data {
			f.data[i] = byte(r.Uint32())
		}
		if err := os.MkdirAll(filepath.Join(fixDir, "vm"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(fixDir, f.name), f.data, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(fixDir, "chains"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Join(fixDir, "oracle"), 0o755); err != nil {
			t.Fatal(err)
		}
		f.chains = testpeers.VMDKChains(t, filepath.Join(fixDir, "chains"), filepath.Join(fixDir, "oracle"))
		f.sim = testpeers.StartVCSim(holder{t}, fixDir)
		fix = f
	})
	if fix == nil {
		t.Fatal("fixture failed to start in an earlier test")
	}
	return fix
}

// holder is a testing.TB whose Cleanup is ignored: the shared simulator
// lives for the whole test binary.
type holder struct{ *testing.T }

func (holder) Cleanup(func()) {}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newTransport(t *testing.T, f *fixture, cfg httpsrc.Config) *httpsrc.Transport {
	if cfg.Thumbprint == "" && !cfg.Insecure {
		cfg.Thumbprint = f.sim.Thumbprint
	}
	if cfg.Log == nil {
		cfg.Log = quiet()
	}
	return httpsrc.New(cfg)
}

func open(t *testing.T, tr *httpsrc.Transport, url string) *sources.Image {
	t.Helper()
	reg := sources.NewRegistry().AddTransport(tr).AddFormat(raw.Format{})
	img, err := reg.Open(context.Background(), url, sources.Options{})
	if err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	t.Cleanup(func() { img.Close() })
	return img
}

// checkReads compares reads of many sizes and offsets with the expected bytes.
func checkReads(t *testing.T, dev io.ReaderAt, want []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(3, 4))
	sizes := []int{1, 511, 4096, 65536, 1 << 20, 3<<20 + 17}
	for i := 0; i < 40; i++ {
		n := sizes[i%len(sizes)]
		off := r.Int64N(int64(len(want)))
		buf := make([]byte, n)
		k, err := dev.ReadAt(buf, off)
		end := min(off+int64(n), int64(len(want)))
		if int64(k) != end-off {
			t.Fatalf("read %d at %d: got %d bytes (%v), want %d", n, off, k, err, end-off)
		}
		if end-off < int64(n) && !errors.Is(err, io.EOF) {
			t.Fatalf("read %d at %d past the end: err %v, want EOF", n, off, err)
		}
		if end-off == int64(n) && err != nil {
			t.Fatalf("read %d at %d: %v", n, off, err)
		}
		if !bytes.Equal(buf[:k], want[off:end]) {
			t.Fatalf("read %d at %d: wrong bytes", n, off)
		}
	}
	whole := make([]byte, len(want))
	if _, err := dev.ReadAt(whole, 0); err != nil {
		t.Fatalf("whole read: %v", err)
	}
	if !bytes.Equal(whole, want) {
		t.Fatal("whole read: wrong bytes")
	}
}

func TestFolderRangeReads(t *testing.T) {
	f := shared(t)
	tr := newTransport(t, f, httpsrc.Config{MaxRequest: 1 << 20})
	img := open(t, tr, f.sim.FolderURL(f.name))
	if img.Size() != int64(len(f.data)) {
		t.Fatalf("size %d, want %d", img.Size(), len(f.data))
	}
	checkReads(t, img, f.data)
	st := tr.Stats()
	// Reads, probing and the cache never fetch the file many times over.
	if st.BytesFetched < int64(len(f.data)) || st.BytesFetched > 8*int64(len(f.data)) {
		t.Fatalf("fetched %d bytes for a %d-byte file", st.BytesFetched, len(f.data))
	}
	if st.Retries != 0 {
		t.Fatalf("%d retries against a healthy server", st.Retries)
	}
	// The extents of a remote file are all data: nothing is guessed.
	ext, err := img.Extents(context.Background(), 0, img.Size())
	if err != nil || len(ext) != 1 || ext[0].Type != block.Data {
		t.Fatalf("extents %v, %v", ext, err)
	}
}

func TestSiblingKeepsQuery(t *testing.T) {
	f := shared(t)
	tr := newTransport(t, f, httpsrc.Config{})
	fsys, name, err := tr.Locate(context.Background(), f.sim.FolderURL(f.name))
	if err != nil {
		t.Fatal(err)
	}
	if name != "disk-flat.vmdk" {
		t.Fatalf("name %q", name)
	}
	want := f.sim.FolderURL("vm/other.vmdk")
	if got := fsys.Describe("other.vmdk"); got != want {
		t.Fatalf("sibling URL %s, want %s", got, want)
	}
	if got := fsys.Describe("../vm/other.vmdk"); got != want {
		t.Fatalf("relative sibling URL %s, want %s", got, want)
	}
	_, err = fsys.Open(context.Background(), "missing.vmdk")
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "missing.vmdk") {
		t.Fatalf("missing sibling: %v", err)
	}
}

func TestTLS(t *testing.T) {
	f := shared(t)
	url := f.sim.FolderURL(f.name)
	ctx := context.Background()
	// Verified by default: the simulator's self-signed certificate is refused.
	reg := sources.NewRegistry().AddTransport(httpsrc.New(httpsrc.Config{Log: quiet()})).AddFormat(raw.Format{})
	if _, err := reg.Open(ctx, url, sources.Options{}); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("unverified server accepted: %v", err)
	}
	// A wrong pin is refused, naming the real thumbprint.
	wrong := strings.Repeat("ab", 32)
	reg = sources.NewRegistry().AddTransport(httpsrc.New(httpsrc.Config{Thumbprint: wrong, Log: quiet()})).AddFormat(raw.Format{})
	if _, err := reg.Open(ctx, url, sources.Options{}); err == nil || !strings.Contains(err.Error(), f.sim.Thumbprint) {
		t.Fatalf("wrong pin: %v", err)
	}
	// The right pin (SHA-256, any case, colons or not) is accepted.
	pin := strings.ToLower(strings.ReplaceAll(f.sim.Thumbprint, ":", ""))
	img := open(t, httpsrc.New(httpsrc.Config{Thumbprint: pin, Log: quiet()}), url)
	buf := make([]byte, 100)
	if _, err := img.ReadAt(buf, 1000); err != nil || !bytes.Equal(buf, f.data[1000:1100]) {
		t.Fatalf("pinned read: %v", err)
	}
	// --insecure works, with a warning logged.
	var log bytes.Buffer
	tr := httpsrc.New(httpsrc.Config{Insecure: true, Log: slog.New(slog.NewTextHandler(&log, nil))})
	open(t, tr, url)
	if !strings.Contains(log.String(), "verification disabled") {
		t.Fatalf("no warning for --insecure: %q", log.String())
	}
	// A password in the URL is refused (it would be in argv).
	if _, _, err := tr.Locate(ctx, strings.Replace(url, "https://", "https://u:secret@", 1)); err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("password in URL: %v", err)
	}
}

// TestSessionCookie logs in through the SOAP API and checks the /folder
// requests carry the session cookie (seen by the proxy in front of the
// simulator).
func TestSessionCookie(t *testing.T) {
	f := shared(t)
	px := testpeers.StartFaultProxy(t, f.sim.SDK.String())
	var mu sync.Mutex
	var cookies []string
	px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
		if strings.HasPrefix(r.URL.Path, "/folder/") {
			mu.Lock()
			cookies = append(cookies, r.Header.Get("Cookie"))
			mu.Unlock()
		}
		return testpeers.Pass
	})
	user, pass := f.sim.User()
	calls := 0
	tr := httpsrc.New(httpsrc.Config{User: user, Log: quiet(), Password: func() (string, error) { calls++; return pass, nil }})
	img := open(t, tr, px.Rewrite(f.sim.FolderURL(f.name)))
	buf := make([]byte, 4096)
	if _, err := img.ReadAt(buf, 8192); err != nil || !bytes.Equal(buf, f.data[8192:8192+4096]) {
		t.Fatalf("read: %v", err)
	}
	// An expired session (401) logs in again and the read goes on.
	logins := 0
	px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
		mu.Lock()
		defer mu.Unlock()
		if r.URL.Path == "/sdk" {
			logins++
		}
		if strings.HasPrefix(r.URL.Path, "/folder/") && r.Method == nethttp.MethodGet {
			cookies = append(cookies, r.Header.Get("Cookie"))
			if len(cookies) == 1 {
				return testpeers.Unauthorized
			}
		}
		return testpeers.Pass
	})
	cookies = nil
	if _, err := img.ReadAt(buf, 5<<20); err != nil || !bytes.Equal(buf, f.data[5<<20:5<<20+4096]) {
		t.Fatalf("read after an expired session: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if logins == 0 || px.Count(testpeers.Unauthorized) != 1 {
		t.Fatalf("401: %d SOAP requests, %d injected", logins, px.Count(testpeers.Unauthorized))
	}
	if len(cookies) == 0 {
		t.Fatal("no /folder request seen")
	}
	for _, c := range cookies {
		if !strings.Contains(c, "vmware_soap_session=") {
			t.Fatalf("/folder request without the session cookie: %q", c)
		}
	}
	if calls != 1 {
		t.Fatalf("password asked %d times", calls)
	}
}

func TestBasicAuthHeader(t *testing.T) {
	f := shared(t)
	px := testpeers.StartFaultProxy(t, f.sim.SDK.String())
	var auth []string
	var mu sync.Mutex
	px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
		mu.Lock()
		auth = append(auth, r.Header.Get("Authorization"))
		mu.Unlock()
		return testpeers.Pass
	})
	tr := httpsrc.New(httpsrc.Config{User: "root", Auth: "basic", Log: quiet(), Password: func() (string, error) { return "pw", nil }})
	img := open(t, tr, px.Rewrite(f.sim.FolderURL(f.name)))
	if _, err := img.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range auth {
		if a != "Basic cm9vdDpwdw==" {
			t.Fatalf("Authorization %q", a)
		}
	}
}

// faultCase runs reads through the proxy with a fault plan.
func TestFaults(t *testing.T) {
	f := shared(t)
	px := testpeers.StartFaultProxy(t, f.sim.SDK.String())
	px.Delay = 1500 * time.Millisecond
	url := px.Rewrite(f.sim.FolderURL(f.name))
	isGet := func(r *nethttp.Request) bool { return r.Method == nethttp.MethodGet }

	// A fault on the first N GETs; the transport must retry and read right.
	for _, tc := range []struct {
		fault testpeers.Fault
		times int
	}{
		{testpeers.Unavailable, 2},
		{testpeers.ResetMidBody, 2},
		{testpeers.Truncate, 3},
		{testpeers.Slow, 1},
	} {
		t.Run(tc.fault.String(), func(t *testing.T) {
			gets := 0
			var mu sync.Mutex
			px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
				mu.Lock()
				defer mu.Unlock()
				if !isGet(r) {
					return testpeers.Pass
				}
				gets++
				if gets <= tc.times {
					return tc.fault
				}
				return testpeers.Pass
			})
			var log bytes.Buffer
			tr := httpsrc.New(httpsrc.Config{Log: slog.New(slog.NewTextHandler(&log, nil)), Backoff: 10 * time.Millisecond,
				Timeout: 500 * time.Millisecond, Cache: filters.CacheOptions{MaxBytes: -1}})
			img := open(t, tr, url)
			off := int64(123457)
			buf := make([]byte, 300000)
			if _, err := img.ReadAt(buf, off); err != nil {
				t.Fatalf("read through %s: %v", tc.fault, err)
			}
			if !bytes.Equal(buf, f.data[off:off+int64(len(buf))]) {
				t.Fatalf("wrong bytes after %s", tc.fault)
			}
			if px.Count(tc.fault) < tc.times {
				t.Fatalf("fault %s injected %d times", tc.fault, px.Count(tc.fault))
			}
			if st := tr.Stats(); st.Retries < int64(tc.times) {
				t.Fatalf("%d retries for %d faults", st.Retries, tc.times)
			}
			if c := strings.Count(log.String(), "retrying"); c < tc.times {
				t.Fatalf("%d retries logged for %d faults: %s", c, tc.times, log.String())
			}
		})
	}

	t.Run("ignored-range", func(t *testing.T) {
		px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
			if isGet(r) {
				return testpeers.IgnoreRange
			}
			return testpeers.Pass
		})
		tr := httpsrc.New(httpsrc.Config{Log: quiet(), Cache: filters.CacheOptions{MaxBytes: -1}})
		img := open(t, tr, url) // probing reads the first 64 KiB, at offset 0
		before := tr.Stats()
		buf := make([]byte, 4096)
		_, err := img.ReadAt(buf, 1<<20)
		if !errors.Is(err, httpsrc.ErrRangeIgnored) || !strings.Contains(err.Error(), "1048576") {
			t.Fatalf("200 to a ranged read: %v", err)
		}
		if st := tr.Stats(); st.BytesFetched != before.BytesFetched || st.Retries > 0 {
			t.Fatalf("ignored range: fetched %d bytes, %d retries", st.BytesFetched-before.BytesFetched, st.Retries)
		}
		// At offset 0 the first bytes of the answer are the right ones.
		if _, err := img.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, f.data[:4096]) {
			t.Fatalf("read at 0 through a server ignoring ranges: %v", err)
		}
	})

	t.Run("persistent-503", func(t *testing.T) {
		px.Set(nil)
		tr := httpsrc.New(httpsrc.Config{Log: quiet(), Attempts: 3, Backoff: time.Millisecond, Cache: filters.CacheOptions{MaxBytes: -1}})
		img := open(t, tr, url)
		px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
			if isGet(r) {
				return testpeers.Unavailable
			}
			return testpeers.Pass
		})
		buf := make([]byte, 4096)
		n, err := img.ReadAt(buf, 5000)
		if err == nil || n != 0 || !strings.Contains(err.Error(), "giving up after 3 attempts") || !strings.Contains(err.Error(), "503") {
			t.Fatalf("persistent 503: n=%d err=%v", n, err)
		}
	})
}

// TestRangeNotSatisfiable shrinks the file after it was opened: the server's
// 416 becomes an error naming the offset.
func TestRangeNotSatisfiable(t *testing.T) {
	f := shared(t)
	name := "vm/shrinking.raw"
	p := filepath.Join(f.sim.Dir, name)
	if err := os.WriteFile(p, f.data[:1<<20], 0o644); err != nil {
		t.Fatal(err)
	}
	tr := newTransport(t, f, httpsrc.Config{Cache: filters.CacheOptions{MaxBytes: -1}})
	img := open(t, tr, f.sim.FolderURL(name))
	if err := os.Truncate(p, 4096); err != nil {
		t.Fatal(err)
	}
	_, err := img.ReadAt(make([]byte, 512), 600000)
	if err == nil || !strings.Contains(err.Error(), "not satisfiable") || !strings.Contains(err.Error(), "600000") {
		t.Fatalf("416: %v", err)
	}
}

// TestChainsOverFolder reads VMDK chains in place on the simulator's
// datastore: descriptors, sparse extents, deltas and their parents are all
// opened by name over /folder; bytes equal qemu-img's of the local files.
func TestChainsOverFolder(t *testing.T) {
	f := shared(t)
	tr := newTransport(t, f, httpsrc.Config{})
	reg := sources.NewRegistry().AddTransport(tr).AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	for _, c := range f.chains {
		t.Run(c.Name, func(t *testing.T) {
			img, err := reg.Open(context.Background(), f.sim.FolderURL("chains/"+c.Top), sources.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			if img.Info.Format != "vmdk" {
				t.Fatalf("format %q", img.Info.Format)
			}
			testpeers.SameAsRaw(t, img, c.Raw)
		})
	}
	if st := tr.Stats(); st.Retries != 0 || st.BytesFetched == 0 {
		t.Fatalf("stats %+v", st)
	}
}

// TestQemuReadsSameURL cross-checks with another client: nbdkit's curl
// plugin reads the same /folder URL and qemu-img reads the VMDK through it.
func TestQemuReadsSameURL(t *testing.T) {
	f := shared(t)
	var c testpeers.Chain
	for _, ch := range f.chains {
		if ch.Name == "streamOptimized" {
			c = ch
		}
	}
	url := f.sim.FolderURL("chains/" + c.Top)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nbdkit", "-f", "--exit-with-parent", "-U", sock, "curl", "url="+url, "sslverify=false")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	out := filepath.Join(t.TempDir(), "qemu.raw")
	if b, err := exec.CommandContext(ctx, "qemu-img", "convert", "-f", "vmdk", "-O", "raw", "nbd+unix:///?socket="+sock, out).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img over nbdkit curl: %v\n%s", err, b)
	}
	reg := sources.NewRegistry().AddTransport(newTransport(t, f, httpsrc.Config{})).AddFormat(vmdk.Format{})
	img, err := reg.Open(ctx, url, sources.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	testpeers.SameAsRaw(t, img, out)
}

// TestChainThroughFaults reads every chain through a proxy that breaks
// every third GET in a different way: retried, and the bytes still equal
// qemu-img's.
func TestChainThroughFaults(t *testing.T) {
	f := shared(t)
	px := testpeers.StartFaultProxy(t, f.sim.SDK.String())
	kinds := []testpeers.Fault{testpeers.Unavailable, testpeers.ResetMidBody, testpeers.Truncate}
	var mu sync.Mutex
	gets := 0
	px.Set(func(n int, r *nethttp.Request) testpeers.Fault {
		mu.Lock()
		defer mu.Unlock()
		if r.Method != nethttp.MethodGet {
			return testpeers.Pass
		}
		gets++
		if gets%3 == 0 {
			return kinds[(gets/3)%len(kinds)]
		}
		return testpeers.Pass
	})
	tr := httpsrc.New(httpsrc.Config{Log: quiet(), Backoff: time.Millisecond})
	reg := sources.NewRegistry().AddTransport(tr).AddFormat(vmdk.Format{}).AddFormat(raw.Format{})
	for _, c := range f.chains {
		img, err := reg.Open(context.Background(), px.Rewrite(f.sim.FolderURL("chains/"+c.Top)), sources.Options{})
		if err != nil {
			t.Fatalf("%s: %v", c.Name, err)
		}
		testpeers.SameAsRaw(t, img, c.Raw)
		img.Close()
	}
	if st := tr.Stats(); st.Retries == 0 || px.Count(testpeers.ResetMidBody) == 0 {
		t.Fatalf("no faults hit: %+v", st)
	}
}

func TestBadURLsKeepSecrets(t *testing.T) {
	tr := httpsrc.New(httpsrc.Config{Log: quiet()})
	for _, u := range []string{"https://u:s3cret@host/%zz", "https://u:s3cret@host/dir/", "https://u:s3cret@host/x.vmdk"} {
		_, _, err := tr.Locate(context.Background(), u)
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Fatalf("%s: %v", u, err)
		}
	}
}
