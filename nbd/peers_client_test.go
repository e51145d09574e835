package nbd_test

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

func dial(t testing.TB, uri string, opts nbd.ClientOptions) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(context.Background(), uri, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestClientNbdkitFile: our client reads nbdkit's file plugin serving the
// fixture: same bytes, and extents equal to what nbdinfo --map says about
// the same server.
func TestClientNbdkitFile(t *testing.T) {
	need(t, "nbdkit", "nbdinfo")
	sock := filepath.Join(t.TempDir(), "s")
	daemon(t, sock, "nbdkit", "-f", "-r", "-U", sock, "file", fixture())
	uri := unixURI(sock, "")
	c := dial(t, uri, nbd.ClientOptions{})
	if c.Size() != fixtureSize || !c.ReadOnly() {
		t.Fatalf("size %d read-only %v", c.Size(), c.ReadOnly())
	}
	if c.Connections() < 2 {
		t.Fatalf("nbdkit file offers multi-conn; client uses %d connections", c.Connections())
	}
	if deviceSHA(t, c) != fileSHA(t, fixture()) {
		t.Fatal("bytes differ from the file")
	}
	got := statusOf(allExtents(t, c))
	sameStatus(t, "client extents vs nbdinfo --map", got, nbdinfoMap(t, uri, ""))
	if len(got) < 10 {
		t.Fatalf("only %d extents: the fixture's holes were not seen", len(got))
	}
	// nbdkit --no-sr refuses structured replies: simple replies, no block
	// status, the whole export is data, the bytes are still right.
	sock2 := filepath.Join(t.TempDir(), "nosr")
	daemon(t, sock2, "nbdkit", "-f", "-r", "--no-sr", "-U", sock2, "file", fixture())
	s := dial(t, unixURI(sock2, ""), nbd.ClientOptions{})
	if s.Structured() || len(s.Contexts()) != 0 {
		t.Fatalf("nbdkit --no-sr: structured %v contexts %v", s.Structured(), s.Contexts())
	}
	if e := allExtents(t, s); len(e) != 1 || e[0].Type != block.Data {
		t.Fatalf("without block status: extents %v", e[:min(len(e), 3)])
	}
	if deviceSHA(t, s) != fileSHA(t, fixture()) {
		t.Fatal("simple replies: bytes differ from the file")
	}
}

// TestClientNbdkitMemoryAndData: writes, zeroes and flushes against nbdkit
// memory (read back by nbdinfo's view and by us), and the data plugin's
// pattern read back.
func TestClientNbdkitMemoryAndData(t *testing.T) {
	need(t, "nbdkit", "nbdcopy")
	dir := t.TempDir()
	sock := filepath.Join(dir, "mem")
	daemon(t, sock, "nbdkit", "-f", "-U", sock, "memory", "4M")
	c := dial(t, unixURI(sock, ""), nbd.ClientOptions{})
	if c.ReadOnly() {
		t.Fatal("memory plugin export is writable")
	}
	p := bytes.Repeat([]byte("vmdk2kvm"), 64<<10) // 512 KiB
	if _, err := c.WriteAt(p, 1<<20+3); err != nil {
		t.Fatal(err)
	}
	if err := c.Zero(1<<20+4096, 8192); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	copy(want[1<<20+3:], p)
	clear(want[1<<20+4096 : 1<<20+4096+8192])
	// nbdcopy, another client, sees the same bytes.
	out := filepath.Join(dir, "mem.raw")
	run(t, "nbdcopy", unixURI(sock, ""), out)
	if fileSHA(t, out) != sha(t, bytes.NewReader(want)) {
		t.Fatal("nbdcopy of nbdkit memory differs from what we wrote")
	}
	got := make([]byte, len(want))
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, want))
	}

	sock2 := filepath.Join(dir, "data")
	daemon(t, sock2, "nbdkit", "-f", "-U", sock2, "data", "data=( 1 2 3 4 )*1024 @1048576 9", "size=2M")
	d := dial(t, unixURI(sock2, ""), nbd.ClientOptions{})
	buf := make([]byte, d.Size())
	if _, err := d.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4096; i++ {
		if buf[i] != byte(i%4+1) {
			t.Fatalf("byte %d is %d", i, buf[i])
		}
	}
	if buf[1<<20] != 9 || buf[4096] != 0 || buf[1<<20+1] != 0 {
		t.Fatalf("data plugin bytes wrong: %d %d %d", buf[1<<20], buf[4096], buf[1<<20+1])
	}
}

// TestClientNbdkitFaults: the error filter's EIO reaches the caller as an
// error matching syscall.EIO; reads under the delay filter, with many in
// flight out of order, still return the right bytes.
func TestClientNbdkitFaults(t *testing.T) {
	need(t, "nbdkit")
	dir := t.TempDir()
	sock := filepath.Join(dir, "err")
	daemon(t, sock, "nbdkit", "-f", "-U", sock, "--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%")
	c := dial(t, unixURI(sock, ""), nbd.ClientOptions{})
	if _, err := c.ReadAt(make([]byte, 4096), 0); err == nil || !errors.Is(err, syscall.EIO) {
		t.Fatalf("read through the error filter: %v, want EIO", err)
	}
	// The connection survives a failed request.
	if _, err := c.WriteAt([]byte{1}, 0); err != nil {
		t.Fatalf("write after a failed read: %v", err)
	}

	sock2 := filepath.Join(dir, "delay")
	daemon(t, sock2, "nbdkit", "-f", "-U", sock2, "--filter=delay", "file", fixture(), "rdelay=20ms")
	d := dial(t, unixURI(sock2, ""), nbd.ClientOptions{Connections: 1})
	var wg sync.WaitGroup
	src := openFixture(t)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			off := int64(i) * 1_300_007
			got, want := make([]byte, 100_003), make([]byte, 100_003)
			if _, err := d.ReadAt(got, off); err != nil {
				t.Error(err)
				return
			}
			src.ReadAt(want, off)
			if !bytes.Equal(got, want) {
				t.Errorf("read at %d differs", off)
			}
		}(i)
	}
	wg.Wait()
}

// TestClientQemuNbd: qemu-nbd serving qcow2 and monolithicSparse VMDK images
// made from the fixture: we read the fixture's bytes, and our extents equal
// nbdinfo's map of the same server.
func TestClientQemuNbd(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img", "nbdinfo")
	dir := t.TempDir()
	want := fileSHA(t, fixture())
	for _, f := range []struct{ format, opts string }{{"qcow2", ""}, {"vmdk", "subformat=monolithicSparse"}} {
		img := filepath.Join(dir, "disk."+f.format)
		args := []string{"convert", "-f", "raw", "-O", f.format}
		if f.opts != "" {
			args = append(args, "-o", f.opts)
		}
		run(t, "qemu-img", append(args, fixture(), img)...)
		sock := filepath.Join(dir, f.format+".sock")
		daemon(t, sock, "qemu-nbd", "-f", f.format, "-r", "-t", "-e", "8", "-k", sock, img)
		uri := unixURI(sock, "")
		c := dial(t, uri, nbd.ClientOptions{})
		if c.Size() != fixtureSize {
			t.Fatalf("%s: size %d", f.format, c.Size())
		}
		if deviceSHA(t, c) != want {
			t.Fatalf("%s: bytes differ from the fixture", f.format)
		}
		sameStatus(t, f.format+" extents vs nbdinfo --map", statusOf(allExtents(t, c)), nbdinfoMap(t, uri, ""))
	}
	// qemu-nbd's default serves one client at a time yet advertises
	// multi-conn: the client must settle for one connection, not hang.
	sock := filepath.Join(dir, "one.sock")
	daemon(t, sock, "qemu-nbd", "-f", "qcow2", "-r", "-t", "-k", sock, filepath.Join(dir, "disk.qcow2"))
	c := dial(t, unixURI(sock, ""), nbd.ClientOptions{})
	if c.Connections() != 1 || deviceSHA(t, c) != want {
		t.Fatalf("qemu-nbd -e 1: %d connections", c.Connections())
	}
}

// TestClientDirtyBitmap: a qcow2 dirty bitmap exported by qemu-nbd -B; our
// view of qemu:dirty-bitmap:b0 equals nbdinfo's, and it marks exactly the
// ranges written after the bitmap was added.
func TestClientDirtyBitmap(t *testing.T) {
	need(t, "qemu-nbd", "qemu-img", "qemu-io", "nbdinfo")
	dir := t.TempDir()
	img := filepath.Join(dir, "d.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 1 0 4M", img) // before the bitmap: clean
	run(t, "qemu-img", "bitmap", "--add", img, "b0")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 2 1M 64k", "-c", "write -P 3 10M 128k", "-c", "write -z 40M 1M", img)
	sock := filepath.Join(dir, "s")
	daemon(t, sock, "qemu-nbd", "-f", "qcow2", "-r", "-t", "-e", "16", "-k", sock, "-B", "b0", img)
	uri := unixURI(sock, "")
	const bitmap = "qemu:dirty-bitmap:b0"

	// Negotiated lazily on a side connection.
	c := dial(t, uri, nbd.ClientOptions{})
	got, err := c.BlockStatus(context.Background(), bitmap, 0, c.Size())
	if err != nil {
		t.Fatal(err)
	}
	want := nbdinfoMap(t, uri, bitmap)
	sameStatus(t, "dirty bitmap vs nbdinfo", got, want)
	var dirty []nbd.Status
	for _, s := range got {
		if s.Flags&nbd.StateDirty != 0 {
			dirty = append(dirty, s)
		}
	}
	if len(dirty) != 3 || dirty[0].Off > 1<<20 || dirty[1].Off > 10<<20 || dirty[2].Off > 40<<20 || dirty[2].Off+dirty[2].Len < 41<<20 {
		t.Fatalf("dirty ranges %v, want three around 1M, 10M, 40M", dirty)
	}
	// Negotiated at dial, on the main connections, over a sub-range.
	c2 := dial(t, uri, nbd.ClientOptions{MetaContexts: []string{bitmap}})
	if len(c2.Contexts()) != 2 {
		t.Fatalf("contexts %v", c2.Contexts())
	}
	part, err := c2.BlockStatus(context.Background(), bitmap, 9<<20, 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	if part[0].Off != 9<<20 || part[len(part)-1].Off+part[len(part)-1].Len != 12<<20 {
		t.Fatalf("sub-range status %v does not cover [9M,12M)", part)
	}
	// An unknown context is a clear error.
	if _, err := c.BlockStatus(context.Background(), "qemu:dirty-bitmap:nope", 0, 4096); err == nil {
		t.Fatal("block status of a missing bitmap succeeded")
	}
}
