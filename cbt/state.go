package cbt

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// StateVersion is the version of the state file format.
const StateVersion = 1

// StateFile is the name of the state file inside a sync target folder.
const StateFile = "vmdk2kvm-sync.json"

// State is what a warm migration knows between runs: per disk, which point
// in time the replica holds (the provider's token, e.g. a CBT change ID), and
// the history of rounds for reports. It describes the replicas only as far
// as they have been flushed: Save is called after the replica's Flush.
type State struct {
	Version int       `json:"version"`
	Source  string    `json:"source"`  // what is being synced (no secrets)
	Created time.Time `json:"created"` // first round
	Disks   []Disk    `json:"disks"`
	Rounds  []Round   `json:"rounds"`
	// Cutover is set once a cutover has completed.
	Cutover *CutoverInfo `json:"cutover,omitempty"`
}

// Disk is the state of one replica.
type Disk struct {
	Key      string `json:"key"`   // stable identifier (vSphere device key, file name)
	Label    string `json:"label"` // for people ("Hard disk 1")
	Replica  string `json:"replica"`
	Format   string `json:"format"`
	Capacity int64  `json:"capacity"`
	Provider string `json:"provider"`
	// Token is what the provider returned for the last committed round
	// (a change ID, a snapshot ID, a manifest digest).
	Token     string    `json:"token"`
	Round     int       `json:"round"` // last round committed for this disk
	UpdatedAt time.Time `json:"updated_at"`
}

// Round is one completed round.
type Round struct {
	N       int          `json:"n"`
	Kind    string       `json:"kind"` // "full", "incremental", "final"
	Start   time.Time    `json:"start"`
	Seconds float64      `json:"seconds"`
	Disks   []RoundDisk  `json:"disks"`
	Totals  RoundTotals  `json:"totals"`
	Phases  []PhaseTimes `json:"phases,omitempty"`
}

// RoundDisk is what one round did to one disk.
type RoundDisk struct {
	Key      string  `json:"key"`
	Provider string  `json:"provider"`
	Full     bool    `json:"full"`
	Warning  string  `json:"warning,omitempty"`
	Changed  int64   `json:"changed_bytes"` // bytes the provider reported
	Read     int64   `json:"read_bytes"`    // bytes read from the source
	Written  int64   `json:"written_bytes"`
	Zeroed   int64   `json:"zeroed_bytes"`
	Seconds  float64 `json:"seconds"` // copy time
	Resized  bool    `json:"resized,omitempty"`
	Capacity int64   `json:"capacity"`
}

// RoundTotals sums a round's disks.
type RoundTotals struct {
	Changed int64 `json:"changed_bytes"`
	Read    int64 `json:"read_bytes"`
	Written int64 `json:"written_bytes"`
	// CopySeconds is the time spent copying (sum over disks).
	CopySeconds float64 `json:"copy_seconds"`
}

// PhaseTimes records how long one step of a round took.
type PhaseTimes struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// CutoverInfo records a completed cutover.
type CutoverInfo struct {
	At              time.Time `json:"at"`
	DowntimeSeconds float64   `json:"downtime_seconds"`
	Overlays        []string  `json:"overlays"`
	DomainXML       string    `json:"domain_xml,omitempty"`
}

// Disk returns the state of the disk with the given key, or nil.
func (s *State) Disk(key string) *Disk {
	for i := range s.Disks {
		if s.Disks[i].Key == key {
			return &s.Disks[i]
		}
	}
	return nil
}

// PutDisk replaces or adds the state of a disk.
func (s *State) PutDisk(d Disk) {
	if p := s.Disk(d.Key); p != nil {
		*p = d
		return
	}
	s.Disks = append(s.Disks, d)
}

// LastRound returns the number of the last completed round (0: none).
func (s *State) LastRound() int {
	if len(s.Rounds) == 0 {
		return 0
	}
	return s.Rounds[len(s.Rounds)-1].N
}

// LoadState reads a state file. A missing file returns an empty state and
// an error satisfying errors.Is(err, fs.ErrNotExist).
func LoadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return &State{Version: StateVersion}, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: corrupt sync state: %w", path, err)
	}
	if s.Version != StateVersion {
		return nil, fmt.Errorf("%s: sync state version %d, this build reads %d", path, s.Version, StateVersion)
	}
	for i, d := range s.Disks {
		if d.Key == "" || d.Replica == "" || d.Capacity < 0 {
			return nil, fmt.Errorf("%s: disk %d: missing key or replica, or negative capacity", path, i)
		}
	}
	return &s, nil
}

// Exists reports whether a state file is present.
func StateExists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, fs.ErrNotExist)
}

// Save writes the state atomically: a temporary file in the same folder,
// fsync, rename over the old file, fsync of the folder. A crash leaves
// either the old or the new state, never a torn one.
func (s *State) Save(path string) error {
	s.Version = StateVersion
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(path, append(b, '\n'), 0o644)
}

// WriteFileAtomic replaces path with data: temp file, fsync, rename, fsync
// of the folder.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("writing %s: %w", tmp, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("syncing %s: %w", tmp, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("closing %s: %w", tmp, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("renaming %s to %s: %w", tmp, path, err)
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a folder so that renames and creations in it are durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing folder %s: %w", dir, err)
	}
	return nil
}
