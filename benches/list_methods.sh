#!/usr/bin/env bash
# List merges of full-size synthetic SD1 checkpoints (fp16, 2.1 GB each): TIES over four
# fine-tunes of a base (density 0.3), next to a four-way weighted sum (`linear`) of the same
# fine-tunes, in one run. Prints wall time and peak RSS of each and the TIES / linear ratio.
# Usage: benches/list_methods.sh [runs] [workdir]   (needs ~5 models of disk)
set -euo pipefail
runs=${1:-1}
dir=${2:-target/bench-list-methods}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
base="$dir/base.safetensors"
[ -f "$base" ] || $bin synth --arch sd1 --size full --seed 1 -o "$base"
for i in 1 2 3 4; do
  [ -f "$dir/ft$i.safetensors" ] || $bin synth --base "$base" --seed $((10 + i)) --strength 0.3 \
      -o "$dir/ft$i.safetensors"
done
deltas=(); models=()
for i in 1 2 3 4; do deltas+=(--delta "$dir/ft$i.safetensors"); models+=(--model "$dir/ft$i.safetensors"); done
for _ in $(seq "$runs"); do
  sync
  /usr/bin/time -f "linear %e %M" sh -c "$bin merge --mode linear ${models[*]} \
      -o '$dir/linear.safetensors' --overwrite --json > /dev/null && sync" 2>&1 | tail -1
  sync
  /usr/bin/time -f "ties %e %M" sh -c "$bin merge --mode ties --base '$base' ${deltas[*]} \
      -p density=0.3 -o '$dir/ties.safetensors' --overwrite --json > /dev/null && sync" 2>&1 | tail -1
done | tee "$dir/times.txt"
rm -f "$dir/linear.safetensors" "$dir/ties.safetensors"
awk '
  { t[$1] += $2; n[$1]++; if ($3 > m[$1]) m[$1] = $3 }
  END {
    printf "linear (4 models)      %7.1f s   peak RSS %6.0f MiB\n", t["linear"] / n["linear"], m["linear"] / 1024
    printf "ties (base + 4 deltas) %7.1f s   peak RSS %6.0f MiB\n", t["ties"] / n["ties"], m["ties"] / 1024
    printf "ties / linear = %.2f\n", t["ties"] / t["linear"]
  }' "$dir/times.txt"
