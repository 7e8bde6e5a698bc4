#!/usr/bin/env bash
# A full-size merge against the copy floor, all in one run (page cache warm, runs
# interleaved so the machine's noise falls on every command alike):
#   cp+sync    cp A copy && sync                (writing one model to disk)
#   ws t1, t2  mergesmith --threads 1|2 merge A B, weight_sum 0.5 (fsyncs its output)
#   ad t1, t2  mergesmith --threads 1|2 merge A B C, add_difference 0.5 (three inputs)
# and prints each median with its ratio to cp+sync's median. With BASELINE=path/to/an/older
# mergesmith, that binary's weight sum (2 threads) is timed in the same runs ("base t2").
# Usage: benches/merge.sh [sd1|sdxl] [runs] [workdir]
# Needs ~5x the model size of free disk (SD1 fp16: 2.1 GB per file; SDXL: 6.9 GB).
set -euo pipefail
arch=${1:-sd1}
runs=${2:-5}
dir=${3:-target/bench-$arch}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
export MERGESMITH_CACHE="$dir/cache"
for m in a:1 b:2 c:3; do
  [ -f "$dir/${m%%:*}.safetensors" ] ||
    $bin synth --arch "$arch" --size full --seed "${m##*:}" -o "$dir/${m%%:*}.safetensors"
done
A=$dir/a.safetensors B=$dir/b.safetensors C=$dir/c.safetensors
# Warm the page cache and the hash memo (the first merge hashes its inputs once).
cat "$A" "$B" "$C" > /dev/null
$bin merge -a "$A" -b "$B" -c "$C" --mode add_difference --alpha 0.5 -o "$dir/out.safetensors" --overwrite --json > /dev/null
rm -f "$dir/out.safetensors"
sync

time1() { # name, command...: "name wall_s maxrss_kib" on stdout
  local name=$1; shift
  rm -f "$dir/copy.safetensors" "$dir/out.safetensors"
  sync
  /usr/bin/time -f "$name %e %M" "$@" 2>&1 >/dev/null | tail -1
}
ws() { echo "$1" --threads "$2" merge -a "$A" -b "$B" --alpha 0.5 -o "$dir/out.safetensors" --json; }
ad() { echo "$1" --threads "$2" merge -a "$A" -b "$B" -c "$C" --mode add_difference --alpha 0.5 -o "$dir/out.safetensors" --json; }
{
  for _ in $(seq "$runs"); do
    time1 cp+sync sh -c "cp '$A' '$dir/copy.safetensors' && sync"
    # shellcheck disable=SC2046
    time1 "ws-t1" $(ws "$bin" 1)
    # shellcheck disable=SC2046
    time1 "ws-t2" $(ws "$bin" 2)
    # shellcheck disable=SC2046
    time1 "ad-t1" $(ad "$bin" 1)
    # shellcheck disable=SC2046
    time1 "ad-t2" $(ad "$bin" 2)
    if [ -n "${BASELINE:-}" ]; then
      # shellcheck disable=SC2046
      time1 "base-t2" $(ws "$BASELINE" 2)
    fi
  done
} > "$dir/times.txt"
rm -f "$dir/copy.safetensors" "$dir/out.safetensors"
# Whether the page cache can hold the three inputs and the output (GiB).
ram=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
need=$(stat -c %s "$A" "$B" "$C" | awk '{ s += $1 } END { printf "%.1f", s * 4 / 3 / 1073741824 }')
awk -v arch="$arch" -v ram="$ram" -v need="$need" '
  { t[$1] = t[$1] " " $2; m[$1] = m[$1] " " $3; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
  function median(s,   a, k, i, j, x) { k = split(s, a, " ");
    for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (a[j] + 0 < a[i] + 0) { x = a[i]; a[i] = a[j]; a[j] = x }
    return a[int((k + 1) / 2)] }
  END {
    floor = median(t["cp+sync"])
    printf "%s, %d runs (medians; ratio = command / cp+sync)\n", arch, split(t["cp+sync"], _, " ")
    if (need > ram) printf "note: three inputs and an output (%.1f GiB) exceed this machine'"'"'s RAM (%.1f GiB): the ad runs read from disk, cp+sync from the page cache\n", need, ram
    for (i = 1; i <= n; i++) { k = order[i]; w = median(t[k])
      printf "%-8s %6.2f s  ratio %.2f  peak RSS %5.0f MiB  runs:%s\n", k, w, w / floor, median(m[k]) / 1024, t[k] }
  }' "$dir/times.txt"
