// Package pipeline orchestrates vmdk2kvm's stages: when each runs, in which
// order, what is recorded. It owns no "how": bytes move through copier,
// changes come from cbt, snapshots from the control plane.
//
// sync*.go is the warm migration: rounds of FETCH→FLATTEN→CONVERT into
// pristine replicas, driven by a change provider per disk, with crash-safe
// state; cutover*.go is the final round plus FIX→VALIDATE on overlays.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/cbt"
	"github.com/vmdk2kvm/vmdk2kvm/copier"
	"github.com/vmdk2kvm/vmdk2kvm/qcow2"
	"github.com/vmdk2kvm/vmdk2kvm/sinks"
	"github.com/vmdk2kvm/vmdk2kvm/sources/raw"
)

// WarmSource is the control plane of a warm migration: it freezes a point in
// time (a snapshot), describes the disks as of that point, and releases it.
type WarmSource interface {
	// Describe names the source in state and reports (no secrets).
	Describe() string
	// Leftovers lists migration snapshots an earlier, killed run left.
	Leftovers(ctx context.Context) ([]string, error)
	// RemoveLeftovers removes them.
	RemoveLeftovers(ctx context.Context) error
	// Freeze creates the migration snapshot and returns the disks as of it.
	Freeze(ctx context.Context) (Frozen, error)
}

// Frozen is one point in time of the source.
type Frozen interface {
	Disks() []FrozenDisk
	// Release removes the migration snapshot.
	Release(ctx context.Context) error
}

// FrozenDisk is one disk at the frozen point.
type FrozenDisk struct {
	Key      string // stable identifier
	Label    string
	Capacity int64
	Provider cbt.Provider
	// Open opens the disk's bytes as of the frozen point (the data path).
	Open func(ctx context.Context) (block.Device, error)
}

// Preparer is implemented by providers that must act before the replica is
// written (the block-hash manifest is invalidated).
type Preparer interface{ Prepare() error }

// Committer is implemented by providers that record something after the
// replica is flushed and before the state is saved.
type Committer interface{ Commit() error }

// SyncConfig configures a warm sync.
type SyncConfig struct {
	Source WarmSource
	Target string // folder of replicas and state
	Format string // replica format: "qcow2" or "raw"; "" keeps the target's (qcow2 when new)
	Sinks  *sinks.Registry
	// Workers and ChunkSize tune the copy.
	Workers   int
	ChunkSize int64
	// Progress receives copy progress per disk.
	Progress func(disk string, p copier.Progress)
	Log      *slog.Logger
	// Hooks for crash tests: called at named points of a round when set.
	Hook func(point string)
}

// Syncer runs rounds against one target folder. It holds an exclusive lock
// on the folder until Close, so two syncs never interleave their writes.
type Syncer struct {
	cfg   SyncConfig
	State *cbt.State
	path  string
	lock  *os.File
}

// LockFile is the lock a Syncer holds in its target folder.
const LockFile = ".vmdk2kvm-sync.lock"

// OpenSync loads (or starts) the state of a target folder.
func OpenSync(cfg SyncConfig) (*Syncer, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if err := os.MkdirAll(cfg.Target, 0o755); err != nil {
		return nil, fmt.Errorf("target folder: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(cfg.Target, LockFile), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("%s is in use by another sync or cutover (%v)", cfg.Target, err)
	}
	// A full round killed mid-copy leaves its unfinished output under the
	// sinks' temporary name; under the lock nobody else can be writing it.
	if stale, _ := filepath.Glob(filepath.Join(cfg.Target, ".disk-*.part-*")); len(stale) > 0 {
		for _, f := range stale {
			os.Remove(f)
		}
		cfg.Log.Info("removed unfinished replicas of an interrupted round", "files", len(stale))
	}
	p := filepath.Join(cfg.Target, cbt.StateFile)
	st, err := cbt.LoadState(p)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		lock.Close()
		return nil, err
	}
	if st.Source == "" {
		st.Source = cfg.Source.Describe()
	} else if st.Source != cfg.Source.Describe() {
		lock.Close()
		return nil, fmt.Errorf("%s holds a sync of %s, not %s: use another --target", cfg.Target, st.Source, cfg.Source.Describe())
	}
	if cfg.Format == "" {
		// Keep the replicas' format; qcow2 for a new target.
		cfg.Format = "qcow2"
		if len(st.Disks) > 0 && st.Disks[0].Format != "" {
			cfg.Format = st.Disks[0].Format
		}
	}
	return &Syncer{cfg: cfg, State: st, path: p, lock: lock}, nil
}

// Close releases the target folder.
func (s *Syncer) Close() error {
	if s.lock == nil {
		return nil
	}
	err := s.lock.Close()
	s.lock = nil
	return err
}

// SetProgress sets the copy progress callback.
func (s *Syncer) SetProgress(f func(disk string, p copier.Progress)) { s.cfg.Progress = f }

// StatePath is where the state lives.
func (s *Syncer) StatePath() string { return s.path }

func (s *Syncer) hook(p string) {
	if s.cfg.Hook != nil {
		s.cfg.Hook(p)
	}
}

// Round runs one round: freeze, for each disk ask the provider what changed
// since the stored token, copy it into the replica, flush, commit the state;
// then release the snapshot. kind labels the round in the history ("" picks
// "full" or "incremental").
func (s *Syncer) Round(ctx context.Context, kind string) (cbt.Round, error) {
	start := time.Now()
	r := cbt.Round{N: s.State.LastRound() + 1, Start: start}
	phase := func(name string, t0 time.Time) {
		r.Phases = append(r.Phases, cbt.PhaseTimes{Name: name, Seconds: time.Since(t0).Seconds()})
	}
	t0 := time.Now()
	frozen, err := s.cfg.Source.Freeze(ctx)
	if err != nil {
		return r, fmt.Errorf("round %d: snapshot: %w", r.N, err)
	}
	phase("snapshot", t0)
	s.hook("frozen")
	var roundErr error
	for _, d := range frozen.Disks() {
		rd, err := s.syncDisk(ctx, r.N, d)
		if err != nil {
			roundErr = fmt.Errorf("round %d: disk %s: %w", r.N, d.Label, err)
			break
		}
		r.Disks = append(r.Disks, rd)
		r.Totals.Changed += rd.Changed
		r.Totals.Read += rd.Read
		r.Totals.Written += rd.Written
		r.Totals.CopySeconds += rd.Seconds
	}
	s.hook("before-release")
	t0 = time.Now()
	// Release even after a failure: at most one migration snapshot exists.
	relCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Minute)
	relErr := frozen.Release(relCtx)
	cancel()
	phase("remove-snapshot", t0)
	if roundErr != nil {
		return r, roundErr
	}
	if relErr != nil {
		return r, fmt.Errorf("round %d: removing the snapshot: %w", r.N, relErr)
	}
	s.hook("released")
	if kind == "" {
		kind = "incremental"
		for _, d := range r.Disks {
			if d.Full {
				kind = "full"
			}
		}
	}
	r.Kind = kind
	r.Seconds = time.Since(start).Seconds()
	s.State.Rounds = append(s.State.Rounds, r)
	if s.State.Created.IsZero() {
		s.State.Created = start
	}
	if err := s.State.Save(s.path); err != nil {
		return r, err
	}
	return r, nil
}

func (s *Syncer) replicaName(key string) string {
	ext := ".qcow2"
	if s.cfg.Format == "raw" {
		ext = ".raw"
	}
	return "disk-" + sanitize(key) + ext
}

func (s *Syncer) syncDisk(ctx context.Context, round int, d FrozenDisk) (cbt.RoundDisk, error) {
	rd := cbt.RoundDisk{Key: d.Key, Provider: d.Provider.Name(), Capacity: d.Capacity}
	prev := s.State.Disk(d.Key)
	since := ""
	name := s.replicaName(d.Key)
	if prev != nil {
		name = prev.Replica
		if _, err := os.Stat(filepath.Join(s.cfg.Target, name)); err == nil && prev.Provider == d.Provider.Name() {
			since = prev.Token
		} else if prev.Token != "" {
			s.cfg.Log.Warn("replica or provider changed: full resync", "disk", d.Label, "replica", name)
		}
		if prev.Format != "" && prev.Format != s.cfg.Format {
			return rd, fmt.Errorf("the replica %s is %s, not %s", name, prev.Format, s.cfg.Format)
		}
	}
	src, err := d.Open(ctx)
	if err != nil {
		return rd, fmt.Errorf("opening the source: %w", err)
	}
	defer src.Close()
	if src.Size() != d.Capacity {
		return rd, fmt.Errorf("the source reads %d bytes, the control plane says %d", src.Size(), d.Capacity)
	}
	path := filepath.Join(s.cfg.Target, name)
	closeReplica := func() {}
	if h, ok := d.Provider.(*cbt.Hash); ok {
		// The block-hash provider hashes the frozen disk and keeps its
		// manifest beside the replica, which it reads to rebuild a lost one.
		if closeReplica, err = s.bindHash(h, src, path); err != nil {
			return rd, err
		}
	}
	res, err := d.Provider.Changed(ctx, since)
	closeReplica()
	if err != nil {
		return rd, fmt.Errorf("changed areas: %w", err)
	}
	if res.Warning != "" {
		s.cfg.Log.Warn(res.Warning, "disk", d.Label)
		rd.Warning = res.Warning
	}
	rd.Full = res.Full
	rd.Changed = res.Bytes()
	if p, ok := d.Provider.(Preparer); ok {
		if err := p.Prepare(); err != nil {
			return rd, err
		}
	}
	opts := copier.Options{Workers: s.cfg.Workers, ChunkSize: s.cfg.ChunkSize}
	if s.cfg.Progress != nil {
		opts.Progress = func(p copier.Progress) { s.cfg.Progress(d.Label, p) }
	}
	s.hook("copy")
	var st copier.Stats
	if res.Full {
		st, err = s.fullCopy(ctx, path, src, res.Extents, opts)
	} else {
		st, rd.Resized, err = s.incrementalCopy(ctx, path, src, res.Extents, opts)
	}
	if err != nil {
		return rd, err
	}
	s.hook("flushed")
	if c, ok := d.Provider.(Committer); ok {
		if err := c.Commit(); err != nil {
			return rd, err
		}
	}
	rd.Read, rd.Written, rd.Zeroed, rd.Seconds = st.Read, st.Written, st.Zeroed, st.Elapsed.Seconds()
	s.State.PutDisk(cbt.Disk{
		Key: d.Key, Label: d.Label, Replica: name, Format: s.cfg.Format, Capacity: d.Capacity,
		Provider: d.Provider.Name(), Token: res.Token, Round: round, UpdatedAt: time.Now().UTC(),
	})
	if err := s.State.Save(s.path); err != nil {
		return rd, fmt.Errorf("committing the state: %w", err)
	}
	s.hook("committed")
	return rd, nil
}

// bindHash gives a block-hash provider its source, its manifest (beside the
// replica) and the replica itself, opened read-only, to rebuild a manifest
// lost in a crash. The returned function closes the replica.
func (s *Syncer) bindHash(h *cbt.Hash, src block.Device, replica string) (func(), error) {
	h.Source = src
	if h.Manifest == "" {
		h.Manifest = replica + ".hashes"
	}
	if h.Workers == 0 {
		h.Workers = s.cfg.Workers
	}
	if _, err := os.Stat(replica); err != nil {
		return func() {}, nil
	}
	var dev block.Device
	switch s.cfg.Format {
	case "qcow2":
		im, err := qcow2.OpenFile(replica)
		if err != nil {
			return nil, fmt.Errorf("opening replica %s: %w", replica, err)
		}
		dev = im
	default:
		rd, err := raw.OpenFile(replica)
		if err != nil {
			return nil, fmt.Errorf("opening replica %s: %w", replica, err)
		}
		dev = rd
	}
	h.Replica = dev
	return func() { h.Replica = nil; dev.Close() }, nil
}

// fullCopy writes a fresh replica under a temporary name and renames it over
// the old one: only the provider's allocated areas are read.
func (s *Syncer) fullCopy(ctx context.Context, path string, src block.Device, alloc []block.Extent, opts copier.Options) (copier.Stats, error) {
	out, err := s.cfg.Sinks.Create(ctx, s.cfg.Format, path, src.Size(), sinks.Options{Workers: opts.Workers})
	if err != nil {
		return copier.Stats{}, err
	}
	opts.TargetZeroed = true
	st, err := copier.Copy(ctx, cbt.Restrict(src, alloc), out, opts)
	if err == nil {
		err = out.Commit(ctx)
	}
	if err != nil {
		out.Abort()
		return st, fmt.Errorf("full copy into %s: %w", path, err)
	}
	return st, cbt.SyncDir(filepath.Dir(path))
}

// incrementalCopy updates the replica in place: the changed ranges only,
// zero ranges zeroed, then Flush.
func (s *Syncer) incrementalCopy(ctx context.Context, path string, src block.Device, changed []block.Extent, opts copier.Options) (copier.Stats, bool, error) {
	rep, err := OpenReplica(path, s.cfg.Format)
	if err != nil {
		return copier.Stats{}, false, err
	}
	closed := false
	defer func() {
		if !closed {
			rep.Close()
		}
	}()
	resized := false
	switch {
	case src.Size() > rep.Size():
		if err := rep.Resize(src.Size()); err != nil {
			return copier.Stats{}, false, fmt.Errorf("growing %s to %d bytes: %w", path, src.Size(), err)
		}
		resized = true
	case src.Size() < rep.Size():
		return copier.Stats{}, false, fmt.Errorf("the disk shrank from %d to %d bytes; shrinking a replica is not supported", rep.Size(), src.Size())
	}
	opts.Ranges = changed
	opts.TargetZeroed = false
	st, err := copier.Copy(ctx, src, rep, opts)
	if err != nil {
		return st, resized, fmt.Errorf("copying changes into %s: %w", path, err)
	}
	if err := rep.Flush(); err != nil {
		return st, resized, fmt.Errorf("flushing %s: %w", path, err)
	}
	closed = true
	return st, resized, rep.Close()
}

func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			b[i] = '_'
		}
	}
	return string(b)
}
