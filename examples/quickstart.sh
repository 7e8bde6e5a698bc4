#!/usr/bin/env bash
# Quick start: make two related tiny SD1.x checkpoints (real key layout, synthetic weights),
# merge them with SuperMerger's GRAD_V per-block weights, and inspect the result.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
mkdir -p out
$bin synth --arch sd1 --seed 1 -o out/base.safetensors --overwrite
$bin synth --base out/base.safetensors --seed 2 --strength 0.2 -o out/tuned.safetensors --overwrite
$bin merge --mode weight_sum -a out/base.safetensors -b out/tuned.safetensors --mbw GRAD_V \
    -o out/merged.safetensors --overwrite --cache out/cache
$bin inspect out/merged.safetensors --cache out/cache
