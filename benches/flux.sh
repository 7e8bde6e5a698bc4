#!/usr/bin/env bash
# Full-size Flux.1 merge against the copy floor, in one run:
#   cp A copy && sync            (writing one model: the least a merge can cost)
#   mergesmith merge && sync     (weight_sum, alpha 0.5, A + B -> out, same storage as A)
# Two BFL transformer files (`--layout bfl`, 11.9 GB each in fp8, 23.8 GB in bf16) are
# synthesised once. Reports wall time and peak RSS of each, and the ratio.
# Usage: benches/flux.sh [fp8_e4m3|bf16] [runs] [workdir]
# Needs 3x the file size of free disk (fp8: ~36 GB; bf16: ~72 GB).
set -euo pipefail
dtype=${1:-fp8_e4m3}
runs=${2:-1}
dir=${3:-target/bench-flux-$dtype}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
export MERGESMITH_CACHE="$dir/cache"
for s in 1 2; do
  f="$dir/$s.safetensors"
  [ -f "$f" ] || /usr/bin/time -f "synth %e s %M KiB" $bin synth --arch flux --layout bfl --size full \
      --dtype "$dtype" --seed "$s" -o "$f"
done
a="$dir/1.safetensors"; b="$dir/2.safetensors"
# The first merge also hashes both inputs once (memoised); time the later ones.
$bin merge -a "$a" -b "$b" --alpha 0.5 -o "$dir/out.safetensors" --overwrite --json > /dev/null
sync
for _ in $(seq "$runs"); do
  rm -f "$dir/copy.safetensors"; sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "copy %e %M" sh -c "cp '$a' '$dir/copy.safetensors' && sync" 2>&1 | tail -1
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "merge %e %M" sh -c "$bin merge -a '$a' -b '$b' --alpha 0.5 -o '$dir/out.safetensors' --overwrite --json > /dev/null && sync" 2>&1 | tail -1
done | tee "$dir/times.txt"
rm -f "$dir/copy.safetensors"
awk -v size="$(stat -c %s "$a")" '
  { t[$1] = $2; m[$1] = $3 }
  END {
    printf "input %.2f GB each\n", size / 1e9
    printf "copy+sync  %7.1f s   peak RSS %6.0f MiB\n", t["copy"], m["copy"] / 1024
    printf "merge+sync %7.1f s   peak RSS %6.0f MiB\n", t["merge"], m["merge"] / 1024
    printf "merge / copy = %.2f\n", t["merge"] / t["copy"]
  }' "$dir/times.txt"
