package ssh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pkg/sftp"
	gossh "golang.org/x/crypto/ssh"
	"golang.org/x/sync/errgroup"
)

// remote is one open remote file and the connection it is read on. When the
// connection dies (a reset, an ESXi host dropping idle sessions) the next
// read dials again and reopens the file, a bounded number of times.
type remote struct {
	t    *Transport
	tg   target
	path string
	desc string
	size int64

	mu     sync.Mutex
	gen    int // bumped by each reconnect
	c      *conn
	sf     *sftp.File // SFTP mode; nil over exec
	closed bool
}

// maxReconnects bounds how often one read dials again.
const maxReconnects = 3

func (r *remote) current() (int, *conn, *sftp.File, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return 0, nil, nil, fmt.Errorf("%s: read after close", r.desc)
	}
	return r.gen, r.c, r.sf, nil
}

// recover reports whether a failed read is worth another try: the
// connection of generation gen died, and a new one (with the file reopened)
// replaced it.
func (r *remote) recover(gen int, c *conn, readErr error) bool {
	select {
	case <-c.dead:
	case <-time.After(2 * time.Second):
		return false // the connection is alive: the error is the file's
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	if r.gen != gen {
		return true // another reader already reconnected
	}
	r.t.cfg.Log.Warn("ssh connection lost, reconnecting", "file", r.desc, "err", readErr)
	nc, err := r.t.acquire(context.Background(), r.tg)
	if err != nil {
		r.t.cfg.Log.Warn("ssh reconnect failed", "file", r.desc, "err", err)
		return false
	}
	var sf *sftp.File
	if r.sf != nil {
		if nc.sftp == nil {
			nc.release()
			return false
		}
		if sf, err = nc.sftp.Open(r.path); err == nil {
			var st os.FileInfo
			if st, err = sf.Stat(); err == nil && st.Size() != r.size {
				err = fmt.Errorf("size changed from %d to %d bytes", r.size, st.Size())
			}
			if err != nil {
				sf.Close()
			}
		}
		if err != nil {
			r.t.cfg.Log.Warn("ssh reopen failed", "file", r.desc, "err", err)
			nc.release()
			return false
		}
		r.sf.Close()
	}
	r.c.release()
	r.c, r.sf, r.gen = nc, sf, r.gen+1
	return true
}

func (r *remote) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	var err error
	if r.sf != nil {
		err = r.sf.Close()
	}
	r.c.release()
	return err
}

// sftpFile is a remote file read over SFTP.
type sftpFile struct{ *remote }

func (c *conn) openSFTP(tg target, p, desc string) (*sftpFile, error) {
	f, err := c.sftp.Open(p)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", desc, sftpErr(err))
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: stat: %w", desc, sftpErr(err))
	}
	if st.IsDir() {
		f.Close()
		return nil, fmt.Errorf("%s: is a directory, not a disk image", desc)
	}
	return &sftpFile{&remote{t: c.t, tg: tg, path: p, desc: desc, size: st.Size(), c: c, sf: f}}, nil
}

// sftpErr maps SFTP status codes to fs errors.
func sftpErr(err error) error {
	var se *sftp.StatusError
	if errors.As(err, &se) && se.FxCode() == sftp.ErrSSHFxNoSuchFile {
		return fs.ErrNotExist
	}
	if errors.Is(err, os.ErrNotExist) {
		return fs.ErrNotExist
	}
	return err
}

func (f *sftpFile) Size() int64 { return f.size }

func (f *sftpFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d", f.desc, off)
	}
	if off >= f.size {
		return 0, io.EOF
	}
	want := p[:min(int64(len(p)), f.size-off)]
	for try := 0; ; try++ {
		gen, c, sf, err := f.current()
		if err != nil {
			return 0, err
		}
		n, err := sf.ReadAt(want, off)
		if err == nil || (errors.Is(err, io.EOF) && n == len(want)) {
			break
		}
		if try < maxReconnects && f.recover(gen, c, err) {
			continue
		}
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the file shrank
		}
		return n, fmt.Errorf("%s: read %d bytes at offset %d: %w", f.desc, len(want), off, err)
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

func (f *sftpFile) Close() error { return f.close() }

// execFile is a remote file read through exec channels running dd, for
// servers without an sftp subsystem.
type execFile struct{ *remote }

// execChunk bounds one dd's output; larger reads run several in parallel.
const execChunk = 8 << 20

func (c *conn) openExec(ctx context.Context, tg target, p, desc string) (*execFile, error) {
	out, err := c.run(ctx, "stat -L -c %s -- "+shellQuote(p)+" 2>&1 || { echo; echo 'vmdk2kvm: stat failed'; }")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", desc, err)
	}
	s := strings.TrimSpace(string(out))
	if strings.HasSuffix(s, "vmdk2kvm: stat failed") {
		msg := strings.TrimSpace(strings.TrimSuffix(s, "vmdk2kvm: stat failed"))
		if strings.Contains(msg, "No such file") {
			return nil, fmt.Errorf("%s: %w (%s)", desc, fs.ErrNotExist, msg)
		}
		return nil, fmt.Errorf("%s: stat: %s", desc, msg)
	}
	size, err := strconv.ParseInt(s, 10, 64)
	if err != nil || size < 0 {
		return nil, fmt.Errorf("%s: stat printed %q, not a size", desc, s)
	}
	return &execFile{&remote{t: c.t, tg: tg, path: p, desc: desc, size: size, c: c}}, nil
}

// run runs a command and returns its stdout.
func (c *conn) run(ctx context.Context, cmd string) ([]byte, error) {
	s, err := c.client.NewSession()
	if err != nil {
		return nil, fmt.Errorf("exec channel: %w", err)
	}
	defer s.Close()
	var out, errb bytes.Buffer
	s.Stdout, s.Stderr = &out, &errb
	done := make(chan error, 1)
	go func() { done <- s.Run(cmd) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		s.Signal(gossh.SIGKILL)
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, fmt.Errorf("%q: %w (%s)", cmd, err, strings.TrimSpace(errb.String()))
	}
	return out.Bytes(), nil
}

func (f *execFile) Size() int64 { return f.size }

func (f *execFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%s: read at negative offset %d", f.desc, off)
	}
	if off >= f.size {
		return 0, io.EOF
	}
	want := p[:min(int64(len(p)), f.size-off)]
	g := errgroup.Group{}
	for pos := 0; pos < len(want); pos += execChunk {
		piece := want[pos:min(pos+execChunk, len(want))]
		at := off + int64(pos)
		g.Go(func() error {
			for try := 0; ; try++ {
				gen, c, _, err := f.current()
				if err != nil {
					return err
				}
				err = f.readChunk(c, piece, at)
				if err == nil || try >= maxReconnects || !f.recover(gen, c, err) {
					return err
				}
			}
		})
	}
	if err := g.Wait(); err != nil {
		return 0, err
	}
	if len(want) < len(p) {
		return len(want), io.EOF
	}
	return len(p), nil
}

// readChunk reads p at off with one dd. The range is widened to 512-byte
// boundaries and dd's block size is the largest power of two (up to 1 MiB)
// dividing both its start and length, so any POSIX dd works (no
// iflag=skip_bytes needed).
func (f *execFile) readChunk(c *conn, p []byte, off int64) error {
	c.sem <- struct{}{} // sessions in flight are bounded per connection
	defer func() { <-c.sem }()
	start := off &^ 511
	end := (off + int64(len(p)) + 511) &^ 511
	bs := int64(1) << min(20, bits.TrailingZeros64(uint64(end-start)), tz(start))
	cmd := fmt.Sprintf("dd if=%s bs=%d skip=%d count=%d", shellQuote(f.path), bs, start/bs, (end-start)/bs)
	s, err := c.client.NewSession()
	if err != nil {
		return fmt.Errorf("%s: exec channel: %w", f.desc, err)
	}
	defer s.Close()
	out, err := s.StdoutPipe()
	if err != nil {
		return err
	}
	var errb bytes.Buffer
	s.Stderr = &errb
	if err := s.Start(cmd); err != nil {
		return fmt.Errorf("%s: %s: %w", f.desc, cmd, err)
	}
	lead := off - start
	_, err = io.CopyN(io.Discard, out, lead)
	if err == nil {
		_, err = io.ReadFull(out, p)
	}
	if err != nil {
		_ = s.Wait()
		return fmt.Errorf("%s: dd of %d bytes at offset %d: %w (%s)", f.desc, len(p), off, shortErr(err), lastLine(errb.String()))
	}
	_, _ = io.Copy(io.Discard, out)
	if err := s.Wait(); err != nil {
		return fmt.Errorf("%s: %s: %w (%s)", f.desc, cmd, err, lastLine(errb.String()))
	}
	return nil
}

func tz(x int64) int {
	if x == 0 {
		return 64
	}
	return bits.TrailingZeros64(uint64(x))
}

func shortErr(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF // the file shrank, or dd failed
	}
	return err
}

func (f *execFile) Close() error { return f.close() }

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func lastLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(strings.TrimSpace(s), "\n", " ; ")), " ")
}
