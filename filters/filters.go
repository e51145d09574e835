// Package filters holds wrappers of a block.Device, in the manner of nbdkit's
// filters: each does one thing and composes with the others.
//
//   - COW: a copy-on-write overlay; writes land in a sparse temporary file,
//     reads and extents merge it with the device below, which is never written.
//   - Retry: re-issues failed reads with exponential backoff, a bounded number
//     of times, and surfaces the last error.
//   - BlockSize: splits requests to a maximum size and aligns them to a
//     minimum one (read-modify-write for unaligned writes).
//   - Cache: a bounded read cache with readahead for high-latency transports.
//
// A filter owns the device it wraps: closing the filter closes it.
package filters
