#!/usr/bin/env bash
# Quick start: make three related tiny SD1.x checkpoints (real key layout, synthetic weights),
# build recipes/example.yaml (two merges and a save), then build it again: nothing changed,
# so every node is a cache hit. Then the other example recipes (LoRAs, generation); finally
# inspect a result.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=target/release/mergesmith
m=recipes/models
mkdir -p "$m"
$bin synth --arch sd1 --seed 1 -o "$m/base.safetensors" --overwrite
$bin synth --base "$m/base.safetensors" --seed 2 --strength 0.2 -o "$m/tuned.safetensors" --overwrite
$bin synth --base "$m/base.safetensors" --seed 3 --strength 0.2 -o "$m/other.safetensors" --overwrite
$bin build recipes/example.yaml
$bin build recipes/example.yaml
# Two more examples: trial merges kept in memory, and a filtered add-difference.
$bin build recipes/trials.yaml --jobs 2
$bin plan recipes/trials.yaml
$bin build recipes/detail-transfer.yaml
# List merge methods: TIES, DARE-TIES and Model Stock over the fine-tunes, a per-block slerp.
$bin build recipes/methods.yaml
# LoRAs: one extracted from tuned - base, merged with a synthetic style LoRA, baked into a merge.
$bin lora synth -m "$m/base.safetensors" --rank 4 --conv-rank 2 -o "$m/style.safetensors" --overwrite
$bin build recipes/styled.yaml
# Generation: two small runnable SD1 models, merged in memory and previewed as PNGs (with
# AUTOMATIC1111's parameters) in recipes/out/previews; the second build finds every image cached.
$bin synth --arch sd1 --size small --seed 1 -o "$m/small-a.safetensors" --overwrite
$bin synth --arch sd1 --size small --seed 2 -o "$m/small-b.safetensors" --overwrite
$bin build recipes/preview.yaml
$bin build recipes/preview.yaml
# XY sweeps (alpha x seed, pinpointed blocks) as grids, and the static report of them.
$bin report recipes/sweep.yaml -o recipes/out/site
# Flux.1: two tiny BFL transformers stored in fp8 (real key layout), merged with SuperMerger's
# 61 Flux blocks (double blocks 0-18 from B at 0.5, the rest at 0.2); the output stays fp8.
$bin synth --arch flux --layout bfl --dtype fp8_e4m3 --seed 1 -o "$m/flux-a.safetensors" --overwrite
$bin synth --arch flux --layout bfl --dtype fp8_e4m3 --seed 2 -o "$m/flux-b.safetensors" --overwrite
flux_alpha="0.2,0.2,0.2$(printf ',0.5%.0s' $(seq 19))$(printf ',0.2%.0s' $(seq 39))"
$bin merge -a "$m/flux-a.safetensors" -b "$m/flux-b.safetensors" --alpha "$flux_alpha" \
    -o recipes/out/flux.safetensors --overwrite
# A kohya-style Flux LoRA baked into the fp8 merge (changed weights are rounded back to fp8),
# with LBW's 61 Flux blocks: single blocks only.
$bin lora synth -m recipes/out/flux.safetensors --rank 4 -o "$m/flux-lora.safetensors" --overwrite
flux_lbw="0,0,0$(printf ',0%.0s' $(seq 19))$(printf ',1%.0s' $(seq 38)),0"
$bin lora apply -m recipes/out/flux.safetensors -l "$m/flux-lora.safetensors:0.8:$flux_lbw" \
    -o recipes/out/flux-lora.safetensors --overwrite
$bin inspect recipes/out/example.safetensors --no-hash | sed -n '1,8p'
