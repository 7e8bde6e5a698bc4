#!/usr/bin/env bash
# Baking a synthetic rank-32 LoRA (every sd-scripts default target) into a full-size synthetic
# SD1 model, next to a copy of the model, and extracting a rank-64 LoRA from two full-size SD1
# models, in one run. Prints wall time and peak RSS per run.
# Usage: benches/lora.sh [runs] [workdir]
set -euo pipefail
runs=${1:-3}
dir=${2:-target/bench-lora}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p "$dir"
[ -f "$dir/base.safetensors" ] || $bin synth --arch sd1 --size full --seed 1 -o "$dir/base.safetensors"
[ -f "$dir/tuned.safetensors" ] || $bin synth --arch sd1 --size full --seed 2 --base "$dir/base.safetensors" \
    --rank 16 -o "$dir/tuned.safetensors"
$bin lora synth -m "$dir/base.safetensors" --rank 32 --seed 1 -o "$dir/lora.safetensors" --overwrite
cp "$dir/base.safetensors" "$dir/copy.safetensors"
for _ in $(seq "$runs"); do
  sync
  /usr/bin/time -f "bake %e s %M KiB" $bin lora apply -m "$dir/base.safetensors" \
      -l "$dir/lora.safetensors:0.8" -o "$dir/baked.safetensors" --overwrite --json > /dev/null
  sync
  /usr/bin/time -f "copy %e s %M KiB" sh -c "cp '$dir/base.safetensors' '$dir/copy.tmp' && mv '$dir/copy.tmp' '$dir/copy.safetensors' && sync"
  /usr/bin/time -f "extract %e s %M KiB" $bin lora extract -a "$dir/tuned.safetensors" \
      -b "$dir/base.safetensors" --rank 64 -o "$dir/extracted.safetensors" --overwrite --json
done
rm -f "$dir/copy.safetensors"
