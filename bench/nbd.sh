#!/usr/bin/env bash
# NBD server: `nbdcopy URI null:` (libnbd's copier, 4 connections) reading
# from `vmdk2kvm serve` vs qemu-nbd serving the same monolithicSparse VMDK,
# and vs `nbdkit file` serving the raw disk (our server on the same raw disk
# beside it), best of 3 with a warm page cache, plus our server's peak RSS.
# Targets (issue 5): >=1.2x qemu-nbd on the VMDK, >=0.9x nbdkit on raw,
# server RSS <= 128 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
[ -x bin/vmdk2kvm ] || CGO_ENABLED=0 go build -o bin/vmdk2kvm ./cmd/vmdk2kvm
src=$(gen_disk)
img="$BENCH_DIR/disk-$BENCH_SIZE-monolithicSparse.vmdk"
[ -s "$img" ] || qemu-img convert -f raw -O vmdk -o subformat=monolithicSparse "$src" "$img"
cat "$src" "$img" >/dev/null # warm the page cache for every server alike

run_dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 600); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; return 1; }

# ours NAME IMAGE: serve IMAGE, time nbdcopy from it; sets RESULT to
# "SECONDS RSS_KIB". Runs in this shell so cleanup knows every process.
ours() {
  local sock="$run_dir/$1.sock" pidf="$run_dir/$1.pid" rss="$run_dir/$1.rss" t
  /usr/bin/time -f '%M' -o "$rss" bin/vmdk2kvm serve --socket "$sock" --pidfile "$pidf" "$2" >/dev/null &
  pids+=($!)
  wait_sock "$sock"
  t=$(best_of 3 nbdcopy "nbd+unix:///?socket=$sock" null:)
  nbdcopy "nbd+unix:///?socket=$sock" - | cmp -s - "$src" ||
    { echo "nbd bench: our $1 export differs from the disk" >&2; exit 1; }
  kill -TERM "$(cat "$pidf")"
  wait "${pids[-1]}" || true
  RESULT="${t% *} $(tail -1 "$rss")"
}

# peer NAME CMD...: run a reference server on $run_dir/NAME.sock, time
# nbdcopy from it; sets RESULT to SECONDS.
peer() {
  local sock="$run_dir/$1.sock" t
  shift
  "$@" >/dev/null 2>&1 &
  pids+=($!)
  wait_sock "$sock"
  t=$(best_of 3 nbdcopy "nbd+unix:///?socket=$sock" null:)
  kill "${pids[-1]}"
  wait "${pids[-1]}" 2>/dev/null || true
  RESULT="${t% *}"
}

ours vmdk "$img"; ours_vmdk=$RESULT
peer qemu qemu-nbd -f vmdk -r -t -e 8 -k "$run_dir/qemu.sock" "$img"; qemu_vmdk=$RESULT
ours raw "$src"; ours_raw=$RESULT
peer kit nbdkit -f -r -U "$run_dir/kit.sock" file "$src"; kit_raw=$RESULT

printf 'nbd %s monolithicSparse VMDK, nbdcopy -> null: vmdk2kvm serve %ss (peak RSS %d MiB) | qemu-nbd %ss | speed ratio %sx (qemu-nbd time / ours)\n' \
  "$BENCH_SIZE" "${ours_vmdk% *}" $(( ${ours_vmdk#* } / 1024 )) "$qemu_vmdk" "$(ratio "$qemu_vmdk" "${ours_vmdk% *}")"
printf 'nbd %s raw, nbdcopy -> null: vmdk2kvm serve %ss (peak RSS %d MiB) | nbdkit file %ss | speed ratio %sx (nbdkit time / ours)\n' \
  "$BENCH_SIZE" "${ours_raw% *}" $(( ${ours_raw#* } / 1024 )) "$kit_raw" "$(ratio "$kit_raw" "${ours_raw% *}")"
