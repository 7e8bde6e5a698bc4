#!/usr/bin/env bash
# Baking a synthetic kohya Flux LoRA (rank 16, every linear layer of the double and single
# blocks: 304 modules) into a full-size synthetic Flux.1 transformer stored in fp8 (BFL
# layout, 11.9 GB), next to a copy of the model, in one run. Changed weights are decoded,
# changed in f32 and rounded back to fp8; the rest is copied. Prints wall time and peak RSS.
# Usage: benches/flux_lora.sh [fp8_e4m3|bf16] [runs] [workdir]   (needs ~3x the model of disk)
set -euo pipefail
dtype=${1:-fp8_e4m3}
runs=${2:-1}
dir=${3:-target/bench-flux-lora-$dtype}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
a="$dir/flux.safetensors"
[ -f "$a" ] || /usr/bin/time -f "synth %e s %M KiB" $bin synth --arch flux --layout bfl --size full \
    --dtype "$dtype" --seed 1 -o "$a"
$bin lora synth -m "$a" --rank 16 --seed 1 -o "$dir/lora.safetensors" --overwrite
for _ in $(seq "$runs"); do
  rm -f "$dir/copy.safetensors"; sync
  /usr/bin/time -f "copy %e %M" sh -c "cp '$a' '$dir/copy.safetensors' && sync" 2>&1 | tail -1
  rm -f "$dir/copy.safetensors"; sync
  /usr/bin/time -f "bake %e %M" sh -c "$bin lora apply -m '$a' -l '$dir/lora.safetensors:0.8' \
      -o '$dir/baked.safetensors' --overwrite --json > /dev/null && sync" 2>&1 | tail -1
done | tee "$dir/times.txt"
rm -f "$dir/baked.safetensors"
awk -v size="$(stat -c %s "$a")" '
  { t[$1] = $2; m[$1] = $3 }
  END {
    printf "model %.2f GB\n", size / 1e9
    printf "copy+sync %7.1f s   peak RSS %6.0f MiB\n", t["copy"], m["copy"] / 1024
    printf "bake+sync %7.1f s   peak RSS %6.0f MiB\n", t["bake"], m["bake"] / 1024
    printf "bake / copy = %.2f\n", t["bake"] / t["copy"]
  }' "$dir/times.txt"
