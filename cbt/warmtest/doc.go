// Package warmtest holds the end-to-end tests of the warm migration: the
// real vmdk2kvm binary (built once in TestMain) runs `sync` and `cutover`
// against govmomi's simulator extended with change tracking (cbt/cbttest),
// and is killed with SIGKILL at chosen steps to prove the state is crash
// safe. It has no non-test code.
package warmtest
