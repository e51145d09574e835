package vmdk

import (
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxDescriptorSize bounds a descriptor (text file or embedded): VMware's are
// a few hundred bytes; anything this large is not a descriptor.
const MaxDescriptorSize = 1 << 20

// NoParentCID is the parentCID of a disk without a parent.
const NoParentCID = 0xffffffff

// Access is an extent's access mode.
type Access string

// Extent access modes as written in descriptors.
const (
	RW       Access = "RW"
	RDONLY   Access = "RDONLY"
	NOACCESS Access = "NOACCESS"
)

// ExtentLine is one extent line of a descriptor:
// ACCESS SECTORS TYPE ["file" [OFFSET [partition-uuid device-id]]].
type ExtentLine struct {
	Access  Access
	Sectors int64  // size in 512-byte sectors
	Type    string // FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, VMFSRDM, VMFSRAW
	File    string // relative to the descriptor; empty for ZERO
	Offset  int64  // FLAT only: start of the extent in the file, in sectors
	Line    int    // 1-based line number in the descriptor
}

// Descriptor is a parsed VMDK descriptor.
type Descriptor struct {
	Version            int
	Encoding           string
	CID                uint32
	ParentCID          uint32
	CreateType         string
	ParentFileNameHint string
	ChangeTrackPath    string
	Extents            []ExtentLine
	// Keys holds every key = value pair outside the extent section, DDB keys
	// included ("ddb.adapterType"), with quotes removed, in file order of
	// first appearance.
	Keys map[string]string
}

// HasParent reports whether the descriptor names a parent disk.
func (d *Descriptor) HasParent() bool { return d.ParentFileNameHint != "" }

// DDB returns a disk database value ("adapterType" for ddb.adapterType).
func (d *Descriptor) DDB(key string) string { return d.Keys["ddb."+key] }

// ParseDescriptor parses descriptor text. LF and CRLF line ends, comments,
// quoted values and file names containing spaces or quotes are accepted; a
// windows-1252 (or ISO-8859-1) descriptor that is not valid UTF-8 is decoded.
// Errors name the line and the field.
func ParseDescriptor(b []byte) (*Descriptor, error) {
	if len(b) > MaxDescriptorSize {
		return nil, fmt.Errorf("descriptor is %d bytes, larger than the %d allowed", len(b), MaxDescriptorSize)
	}
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		b = b[:i] // embedded descriptors are NUL-padded
	}
	text := string(b)
	if !utf8.ValidString(text) {
		text = decodeWindows1252(b)
	}
	text = strings.TrimPrefix(text, "\ufeff")
	d := &Descriptor{ParentCID: NoParentCID, Keys: map[string]string{}}
	sawCID, sawType := false, false
	for i, line := range strings.Split(text, "\n") {
		ln := i + 1
		line = strings.TrimSpace(strings.TrimSuffix(line, "\r"))
		if line == "" || line[0] == '#' {
			continue
		}
		if access, ok := accessPrefix(line); ok {
			e, err := parseExtentLine(line, access)
			if err != nil {
				return nil, fmt.Errorf("descriptor line %d: %w", ln, err)
			}
			e.Line = ln
			d.Extents = append(d.Extents, e)
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("descriptor line %d: %q is neither key=value nor an extent line", ln, trunc(line))
		}
		k, v = strings.TrimSpace(k), unquote(strings.TrimSpace(v))
		if _, dup := d.Keys[k]; !dup {
			d.Keys[k] = v
		}
		var err error
		switch k {
		case "version":
			d.Version, err = strconv.Atoi(v)
		case "encoding":
			d.Encoding = v
		case "CID":
			d.CID, err = parseCID(v)
			sawCID = true
		case "parentCID":
			d.ParentCID, err = parseCID(v)
		case "createType":
			d.CreateType, sawType = v, true
		case "parentFileNameHint":
			d.ParentFileNameHint = v
		case "changeTrackPath":
			d.ChangeTrackPath = v
		}
		if err != nil {
			return nil, fmt.Errorf("descriptor line %d: field %s: %w", ln, k, err)
		}
	}
	if !sawType {
		return nil, fmt.Errorf("descriptor has no createType field")
	}
	if !sawCID {
		d.CID = 0
	}
	return d, nil
}

func accessPrefix(line string) (Access, bool) {
	for _, a := range []Access{RW, RDONLY, NOACCESS} {
		if strings.HasPrefix(line, string(a)) && len(line) > len(a) && (line[len(a)] == ' ' || line[len(a)] == '\t') {
			return a, true
		}
	}
	return "", false
}

func parseExtentLine(line string, access Access) (ExtentLine, error) {
	e := ExtentLine{Access: access}
	rest := strings.TrimSpace(line[len(access):])
	sec, rest := nextField(rest)
	n, err := strconv.ParseInt(sec, 10, 64)
	if err != nil || n < 0 || n > maxSectors {
		return e, fmt.Errorf("extent size %q is not a sector count", sec)
	}
	e.Sectors = n
	e.Type, rest = nextField(rest)
	e.Type = strings.ToUpper(e.Type)
	switch e.Type {
	case "FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW":
	case "":
		return e, fmt.Errorf("extent line has no type")
	default:
		return e, fmt.Errorf("extent type %q is unknown", e.Type)
	}
	if rest == "" {
		if e.Type != "ZERO" {
			return e, fmt.Errorf("%s extent has no file name", e.Type)
		}
		return e, nil
	}
	if rest[0] == '"' {
		// The name ends at the last quote: names may contain quotes.
		end := strings.LastIndexByte(rest, '"')
		if end == 0 {
			return e, fmt.Errorf("extent file name %q has no closing quote", trunc(rest))
		}
		e.File, rest = rest[1:end], strings.TrimSpace(rest[end+1:])
	} else {
		e.File, rest = nextField(rest)
	}
	if e.File == "" && e.Type != "ZERO" {
		return e, fmt.Errorf("%s extent has an empty file name", e.Type)
	}
	if rest != "" {
		off, _ := nextField(rest)
		o, err := strconv.ParseInt(off, 10, 64)
		if err != nil || o < 0 || o > maxSectors {
			return e, fmt.Errorf("extent offset %q is not a sector count", off)
		}
		e.Offset = o
	}
	return e, nil
}

// maxSectors bounds sector counts so that byte offsets never overflow (2^53
// bytes = 8 PiB, far beyond VMware's 62 TB).
const maxSectors = 1 << 44

func nextField(s string) (string, string) {
	s = strings.TrimLeft(s, " \t")
	i := strings.IndexAny(s, " \t")
	if i < 0 {
		return s, ""
	}
	return s[:i], strings.TrimLeft(s[i:], " \t")
}

func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		return v[1 : len(v)-1]
	}
	return v
}

func parseCID(v string) (uint32, error) {
	n, err := strconv.ParseUint(v, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not a 32-bit hex number", trunc(v))
	}
	return uint32(n), nil
}

func trunc(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

// cp1252 maps bytes 0x80..0x9f of windows-1252 to Unicode (0 = undefined,
// kept as the C1 control of ISO-8859-1).
var cp1252 = [32]rune{
	0x20ac, 0, 0x201a, 0x0192, 0x201e, 0x2026, 0x2020, 0x2021, 0x02c6, 0x2030, 0x0160, 0x2039, 0x0152, 0, 0x017d, 0,
	0, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014, 0x02dc, 0x2122, 0x0161, 0x203a, 0x0153, 0, 0x017e, 0x0178,
}

func decodeWindows1252(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		r := rune(c)
		if c >= 0x80 && c < 0xa0 && cp1252[c-0x80] != 0 {
			r = cp1252[c-0x80]
		}
		sb.WriteRune(r)
	}
	return sb.String()
}
