# Shared helpers for bench/*.sh (sourced, not run).
# BENCH_DIR holds generated inputs between runs (git-ignored); BENCH_SIZE sets
# the generated disk's size (default 4G, as the issues ask).
BENCH_DIR=${BENCH_DIR:-$(pwd)/bench/out}
BENCH_SIZE=${BENCH_SIZE:-4G}
mkdir -p "$BENCH_DIR"

# gen_disk prints the path of the generated raw disk, making it once.
gen_disk() {
  local p="$BENCH_DIR/disk-$BENCH_SIZE.raw"
  [ -s "$p" ] || go run ./testdata/gendisk -size "$BENCH_SIZE" -seed 1 "$p" >&2
  echo "$p"
}

# timed CMD...: runs CMD, prints "SECONDS MAXRSS_KIB" on stdout. Untimed,
# first: the files named in BENCH_CLEAN (the outputs) are removed and the
# dirty pages left by the previous run are written out, so no run pays for
# another's writeback or for freeing another's output (qemu-img truncates an
# existing output in place, vmdk2kvm renames over it: both cost time).
BENCH_CLEAN=${BENCH_CLEAN:-}
timed() {
  local t
  # shellcheck disable=SC2086 # a list of paths without spaces
  [ -z "$BENCH_CLEAN" ] || rm -f $BENCH_CLEAN
  sync
  t=$(mktemp)
  /usr/bin/time -f '%e %M' -o "$t" "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; cat "$t" >&2; rm -f "$t"; return 1; }
  tail -1 "$t"
  rm -f "$t"
}

# best_of N CMD...: the fastest of N runs, "SECONDS MAXRSS_KIB".
best_of() {
  local n=$1 best="" cur
  shift
  for _ in $(seq "$n"); do
    cur=$(timed "$@")
    if [ -z "$best" ] || awk -v a="${cur% *}" -v b="${best% *}" 'BEGIN{exit !(a<b)}'; then best=$cur; fi
  done
  echo "$best"
}

# ratio A B: A/B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b==0) b=0.001; printf "%.2f", a/b }'; }
