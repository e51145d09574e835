package nbd

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// Error is an error value a server returned for a request, with the message
// of its error chunk when there was one.
type Error struct {
	Cmd  string // command name, e.g. "READ"
	Off  int64
	Len  int64
	Code uint32 // NBD error value (EIO, EINVAL, ...)
	Msg  string
}

func (e *Error) Error() string {
	name := errNames[e.Code]
	if name == "" {
		name = fmt.Sprintf("error %d", e.Code)
	}
	s := fmt.Sprintf("nbd %s [%d,+%d): %s", e.Cmd, e.Off, e.Len, name)
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Unwrap lets errors.Is(err, syscall.EIO) and friends match.
func (e *Error) Unwrap() error { return syscall.Errno(e.Code) }

// OptionError is a server's refusal of a handshake option.
type OptionError struct {
	Option uint32
	Reply  uint32
	Msg    string
}

func (e *OptionError) Error() string {
	what := repNames[e.Reply]
	if what == "" {
		what = fmt.Sprintf("error reply 0x%x", e.Reply)
	}
	s := fmt.Sprintf("nbd option %d: %s", e.Option, what)
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// errorCode maps a device error to the NBD error value sent to a client.
func errorCode(err error) uint32 {
	var ne *Error
	switch {
	case errors.As(err, &ne):
		return ne.Code
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return ENOSPC
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS), errors.Is(err, os.ErrPermission):
		return EPERM
	case errors.Is(err, syscall.EINVAL):
		return EINVAL
	case errors.Is(err, syscall.ENOMEM):
		return ENOMEM
	case errors.Is(err, syscall.ENOTSUP), errors.Is(err, errors.ErrUnsupported):
		return ENOTSUP
	}
	return EIO
}
