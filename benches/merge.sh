#!/usr/bin/env bash
# Whole-process benchmark of a full-size merge against the I/O floor, all in one run:
#   cat A B > /dev/null   (reading both inputs)
#   cp A copy             (writing one model)
#   mergesmith merge      (weight_sum, alpha 0.5, A + B -> out)
# Usage: benches/merge.sh [sd1|sdxl] [runs] [workdir]
# Needs ~3x the model size of free disk (SD1 fp16: 2 GB per file; SDXL: 6.9 GB).
set -euo pipefail
arch=${1:-sd1}
runs=${2:-3}
dir=${3:-target/bench-$arch}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
export MERGESMITH_CACHE="$dir/cache"
[ -f "$dir/a.safetensors" ] || $bin synth --arch "$arch" --size full --seed 1 -o "$dir/a.safetensors"
[ -f "$dir/b.safetensors" ] || $bin synth --arch "$arch" --size full --seed 2 -o "$dir/b.safetensors"
size=$(( $(stat -c %s "$dir/a.safetensors") + $(stat -c %s "$dir/b.safetensors") ))
# Warm the page cache and the hash memo (the first merge hashes both inputs once).
cat "$dir/a.safetensors" "$dir/b.safetensors" > /dev/null
$bin merge -a "$dir/a.safetensors" -b "$dir/b.safetensors" --alpha 0.5 -o "$dir/out.safetensors" --overwrite --json > /dev/null
sync

measure() { # name, command...: prints "wall_s maxrss_kib" per run on stdout
  local name=$1; shift
  for _ in $(seq "$runs"); do
    sync
    /usr/bin/time -f "$name %e %M" "$@" 2>&1 >/dev/null | tail -1
  done
}
{
  measure cat sh -c "cat '$dir/a.safetensors' '$dir/b.safetensors' > /dev/null"
  measure copy cp "$dir/a.safetensors" "$dir/copy.safetensors"
  measure merge $bin merge -a "$dir/a.safetensors" -b "$dir/b.safetensors" --alpha 0.5 \
      -o "$dir/out.safetensors" --overwrite --json
} > "$dir/times.txt"
rm -f "$dir/copy.safetensors"
out=$(stat -c %s "$dir/out.safetensors")
awk -v size="$size" -v out="$out" '
  { t[$1] = t[$1] " " $2; m[$1] = m[$1] " " $3 }
  function median(s,   a, n, i, j, x) { n = split(s, a, " ");
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
    return a[int((n + 1) / 2)] }
  END {
    printf "inputs %.2f GB, output %.2f GB\n", size / 1e9, out / 1e9
    for (k in t) { w = median(t[k]); r[k] = w
      printf "%-6s median wall %6.2f s   peak RSS %7.0f MiB   runs:%s\n", k, w, median(m[k]) / 1024, t[k] }
    printf "merge throughput (read A+B, write out): %.2f GB/s\n", (size + out) / 1e9 / r["merge"]
    printf "merge / cat = %.2f   merge / copy = %.2f   merge / (cat + copy) = %.2f\n", r["merge"] / r["cat"], r["merge"] / r["copy"], r["merge"] / (r["cat"] + r["copy"])
  }' "$dir/times.txt"
