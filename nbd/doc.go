// Package nbd speaks the Network Block Device protocol both ways, written from
// the protocol description (NetworkBlockDevice/nbd doc/proto.md):
//
//   - Server exports block.Device values by name over fixed-newstyle NBD:
//     structured replies (reads answer holes with OFFSET_HOLE chunks),
//     base:allocation block status from the device's Extents, STARTTLS,
//     concurrent requests answered out of order with bounded memory. qemu-img,
//     nbdcopy, nbdinfo, libguestfs and virt-v2v can then read any source.
//   - Client turns any NBD export (nbdkit, qemu-nbd, our own server) into a
//     block.Device: pipelined requests on each connection, several
//     connections when the server allows multi-conn, structured replies and
//     block status for base:allocation or any other metadata context (such as
//     qemu:dirty-bitmap:NAME).
//
// The server serves each connection with a fixed set of worker goroutines
// (ServerOptions.Workers) that take turns reading a request and then serve
// it themselves, as nbdkit's threads do: replies go out in completion
// order, with no hand-off between a reader and a handler.
//
// Memory is bounded on both sides: the server charges every request's
// buffers to a per-connection and a per-server budget (ServerOptions), sends
// reads in chunks of at most 1 MiB, caps payloads at 32 MiB and drops clients
// that stall mid-payload or stop reading replies; the client bounds requests
// in flight per connection and never sizes an allocation by an unchecked
// server field.
//
// The package depends only on block. 64-bit extended headers are not spoken
// (no peer here has them); neither side needs them.
package nbd
