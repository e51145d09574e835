// Package sources turns a location the user names (a path, an https:// or
// ssh:// URL, an nbd:// URI) into a block.Device, by composing two seams:
//
//   - a Transport resolves a location into an FS (random-access files next to
//     each other: a local folder, a datastore folder over HTTP, an SFTP folder)
//     and the name of the file inside it;
//   - a Format (raw, vmdk, qcow2, ...) recognises a file by its first bytes and
//     opens it as a device, opening sibling files (extents, parents) through
//     the same FS, so a snapshot chain is read in place wherever it lives.
//
// Schemes that serve devices rather than files (nbd) register a DeviceOpener.
// A Registry holds what the binary supports; cmd builds one explicitly, so
// there is no global registration and tests can build their own.
package sources

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/vmdk2kvm/vmdk2kvm/block"
)

// File is one random-access file of a source.
type File interface {
	io.ReaderAt
	Size() int64
	Close() error
}

// Extenter is implemented by files that know their own allocation (a sparse
// local file via SEEK_HOLE). Formats that map the file 1:1 use it.
type Extenter interface {
	Extents(ctx context.Context, off, length int64) ([]block.Extent, error)
}

// FS opens files relative to one folder (the folder of the file first named).
// Names may be relative ("disk-flat.vmdk", "../base/disk.vmdk"); an FS decides
// how to join them with its folder. Absolute names are passed as they are;
// a Format that wants a basename fallback tries it itself.
type FS interface {
	Open(ctx context.Context, name string) (File, error)
	// Describe names a file in messages (a path or URL without secrets).
	Describe(name string) string
}

// Transport resolves user-given locations with one of its schemes.
type Transport interface {
	Schemes() []string // e.g. "file", "https", "ssh"
	Locate(ctx context.Context, location string) (fs FS, name string, err error)
}

// DeviceOpener opens locations whose scheme names a device server (nbd).
type DeviceOpener interface {
	Schemes() []string
	OpenDevice(ctx context.Context, location string, opts Options) (*Image, error)
}

// Options tune how an image is opened.
type Options struct {
	// Format forces a format by name instead of probing ("" probes).
	Format string
	// AllowStaleChain opens a snapshot chain whose parent CID does not match
	// the child's parentCID (the parent was written after the child was made).
	AllowStaleChain bool
}

// Layer describes one file of an image (one link of a snapshot chain).
type Layer struct {
	File      string            `json:"file"`
	Format    string            `json:"format"`
	Subformat string            `json:"subformat,omitempty"`
	ID        string            `json:"id,omitempty"`     // e.g. a VMDK CID
	Parent    string            `json:"parent,omitempty"` // parent file as named by this layer
	ParentID  string            `json:"parent_id,omitempty"`
	Allocated int64             `json:"allocated_bytes"`
	Props     map[string]string `json:"properties,omitempty"`
}

// Info is what `vmdk2kvm info` prints about an image.
type Info struct {
	Format      string            `json:"format"`
	VirtualSize int64             `json:"virtual_size"`
	Layers      []Layer           `json:"layers,omitempty"` // top first
	Props       map[string]string `json:"properties,omitempty"`
}

// Image is an opened source: a device and what is known about it.
type Image struct {
	block.Device
	Info Info
}

// Format recognises and opens one image format.
type Format interface {
	Name() string
	// Probe reports whether head (the first bytes of the file, up to 64 KiB,
	// shorter when the file is) looks like this format.
	Probe(head []byte, name string) bool
	// Open opens name, already opened as f, as an image. Open owns f: it
	// closes it on error, or when the image is closed.
	Open(ctx context.Context, fsys FS, name string, f File, opts Options) (*Image, error)
}

// ProbeSize is how many leading bytes Probe is given.
const ProbeSize = 64 << 10

// Registry is the set of transports and formats a binary supports.
type Registry struct {
	formats    []Format // probed in order; the last should be raw
	transports map[string]Transport
	devices    map[string]DeviceOpener
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{transports: map[string]Transport{}, devices: map[string]DeviceOpener{}}
}

// AddFormat appends a format to the probe order.
func (r *Registry) AddFormat(f Format) *Registry { r.formats = append(r.formats, f); return r }

// AddTransport registers a transport for its schemes.
func (r *Registry) AddTransport(t Transport) *Registry {
	for _, s := range t.Schemes() {
		r.transports[s] = t
	}
	return r
}

// AddDevices registers a device opener for its schemes.
func (r *Registry) AddDevices(d DeviceOpener) *Registry {
	for _, s := range d.Schemes() {
		r.devices[s] = d
	}
	return r
}

// Formats lists the registered format names in probe order.
func (r *Registry) Formats() []string {
	names := make([]string, len(r.formats))
	for i, f := range r.formats {
		names[i] = f.Name()
	}
	return names
}

// Scheme returns the URL scheme of a location, or "file" for a plain path.
func Scheme(location string) string {
	if i := strings.Index(location, "://"); i > 0 && !strings.ContainsAny(location[:i], "/\\") {
		return strings.ToLower(location[:i])
	}
	return "file"
}

// Redact hides a password in a URL-shaped location, for messages.
func Redact(location string) string {
	if Scheme(location) == "file" {
		return location
	}
	u, err := url.Parse(location)
	if err != nil {
		// Unparseable: keep the scheme only, the rest may hold a secret.
		return Scheme(location) + "://…"
	}
	return u.Redacted()
}

// ErrUnsupported is wrapped by errors about schemes or formats not built in.
var ErrUnsupported = errors.New("unsupported")

// Open opens a location as an image.
func (r *Registry) Open(ctx context.Context, location string, opts Options) (*Image, error) {
	scheme := Scheme(location)
	if d, ok := r.devices[scheme]; ok {
		return d.OpenDevice(ctx, location, opts)
	}
	t, ok := r.transports[scheme]
	if !ok {
		return nil, fmt.Errorf("%s: scheme %q: %w", Redact(location), scheme, ErrUnsupported)
	}
	fsys, name, err := t.Locate(ctx, location)
	if err != nil {
		return nil, err
	}
	return r.OpenIn(ctx, fsys, name, opts)
}

// OpenIn opens a file of an FS as an image, probing its format.
func (r *Registry) OpenIn(ctx context.Context, fsys FS, name string, opts Options) (*Image, error) {
	f, err := fsys.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	format, err := r.pick(f, fsys.Describe(name), opts.Format)
	if err != nil {
		f.Close()
		return nil, err
	}
	return format.Open(ctx, fsys, name, f, opts)
}

func (r *Registry) pick(f File, desc, forced string) (Format, error) {
	if forced != "" {
		for _, fm := range r.formats {
			if fm.Name() == forced {
				return fm, nil
			}
		}
		return nil, fmt.Errorf("format %q: %w (known: %s)", forced, ErrUnsupported, strings.Join(r.Formats(), ", "))
	}
	head := make([]byte, min(f.Size(), ProbeSize))
	if n, err := f.ReadAt(head, 0); err != nil && !(errors.Is(err, io.EOF) && n == len(head)) {
		return nil, fmt.Errorf("%s: reading header: %w", desc, err)
	}
	for _, fm := range r.formats {
		if fm.Probe(head, desc) {
			return fm, nil
		}
	}
	return nil, fmt.Errorf("%s: no format recognises this file: %w", desc, ErrUnsupported)
}
