// Package ova reads OVA packages in place: the tar archive is indexed
// without extracting (only its 512-byte headers are read), the OVF
// descriptor is parsed for the VM's disks (in their order, with
// capacities), firmware, CPUs, memory and NICs, the manifest's SHA-1/SHA-256
// digests are checked, and each disk member is opened as a sub-range of the
// archive through a sources.Registry, so a streamOptimized VMDK inside is read
// by the VMDK format directly. The archive itself may be local or remote
// (any transport's File: an OVA on a web server is read with Range requests).
package ova

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"path"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/block"
	"github.com/vmdk2kvm/vmdk2kvm/sources"
)

// Limits on what an archive may make us read or hold.
const (
	maxMembers  = 10000
	maxOVF      = 16 << 20
	maxManifest = 4 << 20
)

// Member is one file of the archive.
type Member struct {
	Name   string `json:"name"`
	Offset int64  `json:"offset"` // of its data in the archive
	Size   int64  `json:"size"`
}

// Package is an opened OVA.
type Package struct {
	f       sources.File
	desc    string
	Members []Member
	OVF     string // the descriptor's member name
	VM      *VM
	// Verified lists the members whose manifest digest matched.
	Verified []string
	files    map[string]ovfFile
}

// Open indexes the archive f (described as desc in messages), parses its
// OVF and checks its manifest when present: a digest that differs refuses
// the package. Open does not own f.
func Open(ctx context.Context, f sources.File, desc string) (*Package, error) {
	p := &Package{f: f, desc: desc}
	if err := p.index(); err != nil {
		return nil, err
	}
	var mf *Member
	for i := range p.Members {
		m := &p.Members[i]
		switch strings.ToLower(path.Ext(m.Name)) {
		case ".ovf":
			if p.OVF == "" {
				p.OVF = m.Name
			}
		case ".mf":
			mf = m
		}
	}
	if p.OVF == "" {
		return nil, fmt.Errorf("%s: no .ovf descriptor in the archive", desc)
	}
	ovf, err := p.readMember(p.OVF, maxOVF)
	if err != nil {
		return nil, err
	}
	if p.VM, p.files, err = parseOVF(ovf); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", desc, p.OVF, err)
	}
	for _, f := range p.files {
		if f.ChunkSize > 0 {
			return nil, fmt.Errorf("%s: file %s is split in chunks (chunkSize=%d): not supported in place; rejoin it with ovftool", desc, f.Href, f.ChunkSize)
		}
	}
	if mf != nil {
		if err := p.verify(ctx, mf.Name); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// index walks the tar headers; each member's data offset is where the
// reader stands after its header.
func (p *Package) index() error {
	sr := io.NewSectionReader(p.f, 0, p.f.Size())
	tr := tar.NewReader(sr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: tar index after %d members: %w", p.desc, len(p.Members), err)
		}
		if len(p.Members) >= maxMembers {
			return fmt.Errorf("%s: more than %d members: not an OVA", p.desc, maxMembers)
		}
		switch h.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
		case tar.TypeDir:
			continue
		case tar.TypeGNUSparse:
			return fmt.Errorf("%s: member %s is a sparse tar entry: not supported in place", p.desc, h.Name)
		default:
			continue // links and the like carry no data we read
		}
		off, err := sr.Seek(0, io.SeekCurrent)
		if err != nil {
			return err
		}
		if h.Size < 0 || off+h.Size > p.f.Size() {
			return fmt.Errorf("%s: member %s (%d bytes at offset %d) runs past the end of the archive (%d bytes)",
				p.desc, h.Name, h.Size, off, p.f.Size())
		}
		p.Members = append(p.Members, Member{Name: cleanName(h.Name), Offset: off, Size: h.Size})
	}
	if len(p.Members) == 0 {
		return fmt.Errorf("%s: an empty archive", p.desc)
	}
	return nil
}

func cleanName(n string) string {
	return strings.TrimPrefix(path.Clean("/"+n), "/")
}

// Member returns the member of that name.
func (p *Package) Member(name string) (Member, bool) {
	n := cleanName(name)
	for _, m := range p.Members {
		if m.Name == n {
			return m, true
		}
	}
	return Member{}, false
}

func (p *Package) readMember(name string, limit int64) ([]byte, error) {
	m, ok := p.Member(name)
	if !ok {
		return nil, fmt.Errorf("%s: no member %s: %w", p.desc, name, fs.ErrNotExist)
	}
	if m.Size > limit {
		return nil, fmt.Errorf("%s: member %s is %d bytes, more than the %d allowed", p.desc, name, m.Size, limit)
	}
	b := make([]byte, m.Size)
	if _, err := p.f.ReadAt(b, m.Offset); err != nil && !(errors.Is(err, io.EOF) && m.Size > 0) {
		return nil, fmt.Errorf("%s: reading %s: %w", p.desc, name, err)
	}
	return b, nil
}

// verify checks every digest of the manifest against its member.
func (p *Package) verify(ctx context.Context, mfName string) error {
	b, err := p.readMember(mfName, maxManifest)
	if err != nil {
		return err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" {
			continue
		}
		// ALG(name)= hex
		open, close := strings.IndexByte(text, '('), strings.LastIndex(text, ")=")
		if open <= 0 || close < open {
			return fmt.Errorf("%s: manifest %s line %d: not ALG(file)= digest: %q", p.desc, mfName, line, text)
		}
		alg, name, want := strings.ToUpper(text[:open]), text[open+1:close], strings.ToLower(strings.TrimSpace(text[close+2:]))
		var h hash.Hash
		switch alg {
		case "SHA1":
			h = sha1.New()
		case "SHA256":
			h = sha256.New()
		case "SHA512":
			h = sha512.New()
		default:
			return fmt.Errorf("%s: manifest %s line %d: digest %s not supported", p.desc, mfName, line, alg)
		}
		m, ok := p.Member(name)
		if !ok {
			return fmt.Errorf("%s: manifest %s lists %s, which the archive lacks", p.desc, mfName, name)
		}
		slog.Info("checking manifest digest", "package", p.desc, "member", m.Name, "bytes", m.Size, "alg", alg)
		if err := hashRange(ctx, h, p.f, m.Offset, m.Size); err != nil {
			return fmt.Errorf("%s: hashing %s: %w", p.desc, m.Name, err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != want {
			return fmt.Errorf("%s: %s of %s is %s but the manifest says %s: the package was altered or damaged; refusing it",
				p.desc, alg, m.Name, got, want)
		}
		p.Verified = append(p.Verified, m.Name)
	}
	return sc.Err()
}

func hashRange(ctx context.Context, h hash.Hash, r io.ReaderAt, off, n int64) error {
	buf := make([]byte, 4<<20)
	for pos := int64(0); pos < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		k := min(int64(len(buf)), n-pos)
		got, err := r.ReadAt(buf[:k], off+pos)
		if int64(got) != k {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("at member offset %d: %w", pos, err)
		}
		h.Write(buf[:k])
		pos += k
	}
	return nil
}

// FS returns the members as a sources.FS: a VMDK inside opens its siblings
// (a descriptor's extents) among the members.
func (p *Package) FS() sources.FS { return memberFS{p} }

type memberFS struct{ p *Package }

func (m memberFS) Describe(name string) string { return m.p.desc + "/" + cleanName(name) }

func (m memberFS) Open(_ context.Context, name string) (sources.File, error) {
	mem, ok := m.p.Member(name)
	if !ok {
		return nil, fmt.Errorf("%s: %w", m.Describe(name), fs.ErrNotExist)
	}
	return &memberFile{SectionReader: io.NewSectionReader(m.p.f, mem.Offset, mem.Size)}, nil
}

// memberFile is a sub-range of the archive; closing it leaves the archive
// open.
type memberFile struct{ *io.SectionReader }

func (memberFile) Close() error { return nil }

// OpenDisk opens disk i of the VM (in the VM's order) through reg.
func (p *Package) OpenDisk(ctx context.Context, reg *sources.Registry, i int, opts sources.Options) (*sources.Image, error) {
	if i < 0 || i >= len(p.VM.Disks) {
		return nil, fmt.Errorf("%s: disk %d: the VM has %d disks", p.desc, i, len(p.VM.Disks))
	}
	d := p.VM.Disks[i]
	if d.File == "" {
		return nil, fmt.Errorf("%s: disk %s has no file (an empty disk of %d bytes)", p.desc, d.ID, d.Capacity)
	}
	for _, f := range p.files {
		if f.Href == d.File && f.Compression != "" && f.Compression != "identity" {
			return nil, fmt.Errorf("%s: disk file %s is %s-compressed: not readable in place", p.desc, d.File, f.Compression)
		}
	}
	opts.Format = "" // the OVA's own format name does not apply to its members
	img, err := reg.OpenIn(ctx, p.FS(), d.File, opts)
	if err != nil {
		return nil, err
	}
	if img.Size() != d.Capacity && d.Capacity > 0 {
		img.Close()
		return nil, fmt.Errorf("%s: disk %s is %d bytes but the OVF says %d", p.desc, d.File, img.Size(), d.Capacity)
	}
	return img, nil
}

// Format opens an .ova as the first disk of its VM. Disks is the registry
// that opens the disk members (usually the same registry, with vmdk).
type Format struct{ Disks *sources.Registry }

// Name implements sources.Format.
func (Format) Name() string { return "ova" }

// Probe implements sources.Format: a tar archive whose first member is an
// .ovf descriptor, as the OVF specification requires of an OVA.
func (Format) Probe(head []byte, _ string) bool {
	if len(head) < 512 || string(head[257:262]) != "ustar" {
		return false
	}
	name := head[:100]
	if i := bytes.IndexByte(name, 0); i >= 0 {
		name = name[:i]
	}
	return strings.EqualFold(path.Ext(string(name)), ".ovf")
}

// Open implements sources.Format.
func (fm Format) Open(ctx context.Context, fsys sources.FS, name string, f sources.File, opts sources.Options) (*sources.Image, error) {
	if fm.Disks == nil {
		f.Close()
		return nil, errors.New("ova: no registry to open the disks with")
	}
	p, err := Open(ctx, f, fsys.Describe(name))
	if err != nil {
		f.Close()
		return nil, err
	}
	if len(p.VM.Disks) == 0 {
		f.Close()
		return nil, fmt.Errorf("%s: the OVF lists no disks", fsys.Describe(name))
	}
	img, err := p.OpenDisk(ctx, fm.Disks, 0, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	info := img.Info
	props := map[string]string{}
	for k, v := range info.Props {
		props[k] = v
	}
	props["ova.vm"] = p.VM.Name
	props["ova.disk"] = fmt.Sprintf("1 of %d (%s)", len(p.VM.Disks), p.VM.Disks[0].File)
	props["ova.firmware"] = p.VM.Firmware
	props["ova.cpus"] = fmt.Sprint(p.VM.CPUs)
	props["ova.memory_bytes"] = fmt.Sprint(p.VM.MemoryBytes)
	props["ova.nics"] = fmt.Sprint(len(p.VM.NICs))
	if p.VM.OSType != "" {
		props["ova.os_type"] = p.VM.OSType
	}
	if len(p.Verified) > 0 {
		props["ova.manifest_verified"] = strings.Join(p.Verified, ",")
	}
	info.Props = props
	info.Format = "ova/" + info.Format
	return &sources.Image{Device: &device{Device: img.Device, f: f, pkg: p}, Info: info}, nil
}

// device is the first disk; closing it closes the archive too.
type device struct {
	block.Device
	f   sources.File
	pkg *Package
}

func (d *device) Close() error {
	err := d.Device.Close()
	if e := d.f.Close(); err == nil {
		err = e
	}
	return err
}

// PackageOf returns the OVA an image opened by Format came from, or nil.
func PackageOf(img *sources.Image) *Package {
	if d, ok := img.Device.(*device); ok {
		return d.pkg
	}
	return nil
}
