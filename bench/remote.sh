#!/usr/bin/env bash
# Remote sources: reading a flat VMDK (descriptor + the generated disk as its
# -flat extent) over loopback HTTPS with 4 connections vs `curl -k -o
# /dev/null` of the same extent, and over SSH (SFTP) from a local sshd vs
# `ssh host cat FILE > /dev/null`. Ours is bench/remoteread: the real
# transport, VMDK format and copy engine, discarding the bytes as curl/ssh
# do. Best of 2, with our peak RSS. Targets (issue 6): >=1.0x curl, >=0.8x ssh cat.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
src=$(gen_disk)
size=$(stat -c %s "$src")
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

ln -s "$src" "$work/disk-flat.vmdk"
cat >"$work/disk.vmdk" <<DESC
# Disk DescriptorFile
version=1
CID=fffffffe
parentCID=ffffffff
createType="vmfs"

# Extent description
RW $((size / 512)) VMFS "disk-flat.vmdk"

# The Disk Data Base
#DDB
ddb.adapterType = "lsilogic"
DESC
go build -o "$work/remoteread" ./bench/remoteread
go build -o "$work/tlsserve" ./bench/tlsserve
cat "$src" >/dev/null # warm the page cache for every reader alike

# HTTPS: a plain Go TLS file server (Range supported) on 127.0.0.1.
"$work/tlsserve" -dir "$work" >"$work/tls.txt" 2>/dev/null &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/tls.txt" ] && break; sleep 0.1; done
read -r base thumb <"$work/tls.txt"
ours=$(best_of 2 "$work/remoteread" -connections 4 -thumbprint "$thumb" "${base}disk.vmdk")
"$work/remoteread" -connections 4 -thumbprint "$thumb" "${base}disk.vmdk" >"$work/ours.json"
curl=$(best_of 2 curl -sSk -o /dev/null "${base}disk-flat.vmdk")
printf 'remote https %s flat VMDK: vmdk2kvm (4 connections) %ss (%s MiB/s, peak RSS %d MiB) | curl -k -o /dev/null %ss (%s MiB/s) | speed ratio %sx (curl time / ours)\n' \
  "$BENCH_SIZE" "${ours% *}" "$(awk -v s="$size" -v t="${ours% *}" 'BEGIN{printf "%.0f", s/t/1048576}')" $(( ${ours#* } / 1024 )) \
  "${curl% *}" "$(awk -v s="$size" -v t="${curl% *}" 'BEGIN{printf "%.0f", s/t/1048576}')" "$(ratio "${curl% *}" "${ours% *}")"
echo "  transport counters: $(cat "$work/ours.json")"

# SSH: OpenSSH sshd on 127.0.0.1 with generated keys (sftp: internal-sftp).
mkdir -p /run/sshd 2>/dev/null || true
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
user=$(id -un)
for try in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 40000))
  cat >"$work/sshd_config" <<CFG
Port $port
ListenAddress 127.0.0.1
HostKey $work/host_key
AuthorizedKeysFile $work/authorized_keys
PidFile $work/sshd.pid
StrictModes no
UsePAM no
PermitRootLogin yes
PasswordAuthentication no
Subsystem sftp internal-sftp
CFG
  /usr/sbin/sshd -D -f "$work/sshd_config" -E "$work/sshd.log" &
  sshd_pid=$!
  ok=""
  for _ in $(seq 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ok=1; break; fi
    kill -0 "$sshd_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [ -n "$ok" ]; then pids+=("$sshd_pid"); break; fi
  kill "$sshd_pid" 2>/dev/null || true
done
[ -n "$ok" ] || { echo "remote: sshd did not start" >&2; cat "$work/sshd.log" >&2; exit 1; }
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$work/host_key.pub")" >"$work/known_hosts"
sshopts=(-i "$work/client_key" -o UserKnownHostsFile="$work/known_hosts" -o StrictHostKeyChecking=yes -o BatchMode=yes -p "$port")
ours=$(best_of 2 "$work/remoteread" -connections 4 -ssh-key "$work/client_key" -known-hosts "$work/known_hosts" \
  "ssh://$user@127.0.0.1:$port$work/disk.vmdk")
sshcat=$(best_of 2 sh -c 'ssh "$@" >/dev/null' sh "${sshopts[@]}" "$user@127.0.0.1" cat "$src")
printf 'remote ssh %s flat VMDK: vmdk2kvm (sftp) %ss (%s MiB/s, peak RSS %d MiB) | ssh cat > /dev/null %ss (%s MiB/s) | speed ratio %sx (ssh cat time / ours)\n' \
  "$BENCH_SIZE" "${ours% *}" "$(awk -v s="$size" -v t="${ours% *}" 'BEGIN{printf "%.0f", s/t/1048576}')" $(( ${ours#* } / 1024 )) \
  "${sshcat% *}" "$(awk -v s="$size" -v t="${sshcat% *}" 'BEGIN{printf "%.0f", s/t/1048576}')" "$(ratio "${sshcat% *}" "${ours% *}")"
