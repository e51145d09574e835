// Protocol constants, named as in the NBD protocol description.

package nbd

// Magic numbers.
const (
	magicNBD             = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt             = 0x49484156454f5054 // "IHAVEOPT"
	magicOldstyle        = 0x00420281861253
	magicOptReply        = 0x3e889045565a9
	magicRequest         = 0x25609513
	magicSimpleReply     = 0x67446698
	magicStructuredReply = 0x668e33ef
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1
)

// Option types.
const (
	OptExportName      = 1
	OptAbort           = 2
	OptList            = 3
	OptStartTLS        = 5
	OptInfo            = 6
	OptGo              = 7
	OptStructuredReply = 8
	OptListMetaContext = 9
	OptSetMetaContext  = 10
)

// Option reply types.
const (
	RepAck              = 1
	RepServer           = 2
	RepInfo             = 3
	RepMetaContext      = 4
	repErr              = 1 << 31
	RepErrUnsup         = repErr + 1
	RepErrPolicy        = repErr + 2
	RepErrInvalid       = repErr + 3
	RepErrPlatform      = repErr + 4
	RepErrTLSReqd       = repErr + 5
	RepErrUnknown       = repErr + 6
	RepErrShutdown      = repErr + 7
	RepErrBlockSizeReqd = repErr + 8
	RepErrTooBig        = repErr + 9
)

// Information types of NBD_OPT_INFO and NBD_OPT_GO.
const (
	InfoExport      = 0
	InfoName        = 1
	InfoDescription = 2
	InfoBlockSize   = 3
)

// Transmission flags.
const (
	FlagHasFlags        = 1 << 0
	FlagReadOnly        = 1 << 1
	FlagSendFlush       = 1 << 2
	FlagSendFUA         = 1 << 3
	FlagRotational      = 1 << 4
	FlagSendTrim        = 1 << 5
	FlagSendWriteZeroes = 1 << 6
	FlagSendDF          = 1 << 7
	FlagCanMultiConn    = 1 << 8
	FlagSendResize      = 1 << 9
	FlagSendCache       = 1 << 10
	FlagSendFastZero    = 1 << 11
)

// Commands.
const (
	CmdRead        = 0
	CmdWrite       = 1
	CmdDisc        = 2
	CmdFlush       = 3
	CmdTrim        = 4
	CmdCache       = 5
	CmdWriteZeroes = 6
	CmdBlockStatus = 7
)

// Command flags.
const (
	CmdFlagFUA      = 1 << 0
	CmdFlagNoHole   = 1 << 1
	CmdFlagDF       = 1 << 2
	CmdFlagReqOne   = 1 << 3
	CmdFlagFastZero = 1 << 4
)

// Structured reply flags and types.
const (
	replyFlagDone = 1 << 0

	ReplyTypeNone        = 0
	ReplyTypeOffsetData  = 1
	ReplyTypeOffsetHole  = 2
	ReplyTypeBlockStatus = 5
	replyTypeErrBit      = 1 << 15
	ReplyTypeError       = replyTypeErrBit + 1
	ReplyTypeErrorOffset = replyTypeErrBit + 2
)

// Error values of the transmission phase.
const (
	EPERM     = 1
	EIO       = 5
	ENOMEM    = 12
	EINVAL    = 22
	ENOSPC    = 28
	EOVERFLOW = 75
	ENOTSUP   = 95
	ESHUTDOWN = 108
)

// base:allocation status flags.
const (
	StateHole = 1 << 0
	StateZero = 1 << 1
)

// StateDirty is the one flag of qemu's "qemu:dirty-bitmap:NAME" contexts:
// the range was written since the bitmap was created or last cleared.
const StateDirty = 1 << 0

// ContextBaseAllocation is the metadata context every server may offer.
const ContextBaseAllocation = "base:allocation"

// Limits.
const (
	// MaxRequest is the largest READ or WRITE payload either side accepts
	// (the spec's advice for the maximum block size).
	MaxRequest = 32 << 20
	// maxOption bounds option payloads a server accepts; strings are at
	// most 4096 bytes by the spec, so this leaves room for many queries.
	maxOption = 64 << 10
	// maxString is the spec's hard limit on a string (export names,
	// context names, messages).
	maxString = 4096
	// defaultPort is the IANA port for NBD.
	defaultPort = "10809"
)

var cmdNames = map[uint16]string{
	CmdRead: "READ", CmdWrite: "WRITE", CmdDisc: "DISC", CmdFlush: "FLUSH", CmdTrim: "TRIM",
	CmdCache: "CACHE", CmdWriteZeroes: "WRITE_ZEROES", CmdBlockStatus: "BLOCK_STATUS",
}

var errNames = map[uint32]string{
	EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
	EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
}

var repNames = map[uint32]string{
	RepErrUnsup: "unsupported option", RepErrPolicy: "refused by policy", RepErrInvalid: "invalid option",
	RepErrPlatform: "unsupported on the server's platform", RepErrTLSReqd: "TLS required",
	RepErrUnknown: "unknown export", RepErrShutdown: "server shutting down",
	RepErrBlockSizeReqd: "block size negotiation required", RepErrTooBig: "request too big",
}
