package nbd_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/nbd"
)

// TestClientServerModel holds our client against our server against the
// block.Memory model: random writes, zeros, trims and reads through NBD
// must leave the export byte-identical (and extent-identical) to the same
// operations applied to a plain Memory.
func TestClientServerModel(t *testing.T) {
	for _, simple := range []bool{false, true} {
		name := "structured"
		if simple {
			name = "simple"
		}
		t.Run(name, func(t *testing.T) {
			const size = 8 << 20
			served := block.NewMemory(size, 4096)
			model := block.NewMemory(size, 4096)
			sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Name: "m", Device: served, Writable: true})
			c, err := nbd.Dial(context.Background(), unixURI(sock, "m"), nbd.ClientOptions{NoStructuredReplies: simple})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if c.Size() != size || c.ReadOnly() || c.Structured() == simple {
				t.Fatalf("size %d read-only %v structured %v", c.Size(), c.ReadOnly(), c.Structured())
			}
			if want := !simple; (len(c.Contexts()) == 1) != want {
				t.Fatalf("contexts %v", c.Contexts())
			}
			if c.Connections() != 4 {
				t.Fatalf("multi-conn server: %d connections, want 4", c.Connections())
			}
			rng := rand.New(rand.NewPCG(1, 2))
			for i := 0; i < 300; i++ {
				off := rng.Int64N(size - 1)
				n := min(rng.Int64N(600<<10)+1, size-off)
				switch rng.IntN(4) {
				case 0, 1:
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(rng.IntN(250) + 1)
					}
					if _, err := c.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					model.WriteAt(p, off)
				case 2:
					if err := c.Zero(off, n); err != nil {
						t.Fatal(err)
					}
					model.Zero(off, n)
				case 3:
					if err := c.Trim(off, n); err != nil {
						t.Fatal(err)
					}
					model.Zero(off, n) // the client keeps block.Writable's promise with WRITE_ZEROES
				}
			}
			if err := c.Flush(); err != nil {
				t.Fatal(err)
			}
			// Reads at odd offsets and sizes, concurrently.
			var wg sync.WaitGroup
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func(seed uint64) {
					defer wg.Done()
					r := rand.New(rand.NewPCG(seed, 9))
					for i := 0; i < 40; i++ {
						off := r.Int64N(size)
						n := r.Int64N(5<<20) + 1
						got, want := make([]byte, n), make([]byte, n)
						gn, gerr := c.ReadAt(got, off)
						wn, werr := model.ReadAt(want, off)
						if gn != wn || (gerr == nil) != (werr == nil) || !bytes.Equal(got[:gn], want[:wn]) {
							t.Errorf("read [%d,+%d): got %d %v, want %d %v, equal %v", off, n, gn, gerr, wn, werr, bytes.Equal(got[:gn], want[:wn]))
							return
						}
					}
				}(uint64(g))
			}
			wg.Wait()
			if deviceSHA(t, c) != deviceSHA(t, model) {
				t.Fatal("whole-device hash differs")
			}
			got, want := allExtents(t, c), allExtents(t, model)
			if !simple {
				sameStatus(t, "extents", statusOf(got), statusOf(want))
			} else if len(got) != 1 || got[0].Type != block.Data {
				t.Fatalf("without block status the export should be all data, got %v", got[:min(3, len(got))])
			}
		})
	}
}

// countingDevice records how many reads run at once.
type countingDevice struct {
	block.Device
	cur, peak atomic.Int32
	gate      chan struct{}
}

func (d *countingDevice) ReadAt(p []byte, off int64) (int, error) {
	n := d.cur.Add(1)
	defer d.cur.Add(-1)
	for {
		old := d.peak.Load()
		if n <= old || d.peak.CompareAndSwap(old, n) {
			break
		}
	}
	<-d.gate
	return d.Device.ReadAt(p, off)
}

// TestPipelining proves both halves overlap requests: one client
// connection (no multi-conn use) with many goroutines reading must make the
// server run several device reads at once. The device holds every read
// until 8 are in flight, so without pipelining this test hangs (and fails
// at the test timeout) instead of passing.
func TestPipelining(t *testing.T) {
	mem := block.NewMemory(16<<20, 4096)
	mem.WriteAt(bytes.Repeat([]byte{7}, 16<<20), 0)
	dev := &countingDevice{Device: mem, gate: make(chan struct{})}
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Device: dev})
	c, err := nbd.Dial(context.Background(), unixURI(sock, ""), nbd.ClientOptions{Connections: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := make([]byte, 64<<10)
			if _, err := c.ReadAt(p, int64(i)<<20); err != nil || p[0] != 7 {
				t.Errorf("read %d: %v", i, err)
			}
		}(i)
	}
	for dev.peak.Load() < 8 {
		time.Sleep(time.Millisecond)
	}
	close(dev.gate)
	wg.Wait()
	if p := dev.peak.Load(); p < 8 {
		t.Fatalf("peak concurrent device reads %d, want 8", p)
	}
}

// TestReadOnlyAndBounds checks the errors a client gets: writes to a
// read-only export and reads past the end.
func TestReadOnlyAndBounds(t *testing.T) {
	dev := openFixture(t)
	sock, _ := serve(t, nbd.ServerOptions{}, nbd.Export{Name: "ro", Device: dev})
	c, err := nbd.Dial(context.Background(), unixURI(sock, "ro"), nbd.ClientOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !c.ReadOnly() {
		t.Fatal("export should be read-only")
	}
	if _, err := c.WriteAt([]byte{1}, 0); err == nil {
		t.Fatal("write to a read-only export succeeded")
	}
	p := make([]byte, 8192)
	n, err := c.ReadAt(p, c.Size()-4096)
	if n != 4096 || err == nil {
		t.Fatalf("read across the end: %d, %v; want 4096, io.EOF", n, err)
	}
	if _, err := nbd.Dial(context.Background(), unixURI(sock, "nope"), nbd.ClientOptions{}); err == nil {
		t.Fatal("dial of an unknown export succeeded")
	} else {
		var oe *nbd.OptionError
		if !errors.As(err, &oe) || oe.Reply != nbd.RepErrUnknown {
			t.Fatalf("unknown export: %v, want an NBD_REP_ERR_UNKNOWN option error", err)
		}
	}
}
