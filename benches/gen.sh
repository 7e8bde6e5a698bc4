#!/usr/bin/env bash
# Seconds per sampling step of a full-size synthetic SD1 model at 512x512 (classifier-free
# guidance: two U-Net passes per step), on the CPU or a GPU. Runs `gen` with 1 and with
# STEPS steps; the difference over STEPS - 1 is the time per step (loading, text encoding
# and VAE decoding cancel out). The tokenizer is a small stand-in with CLIP's special tokens
# (the prompt's content does not change the cost).
# Usage: benches/gen.sh [steps] [device] [workdir] [binary]
set -euo pipefail
steps=${1:-3}
device=${2:-cpu}
dir=${3:-target/bench-gen}
cd "$(dirname "$0")/.."
bin=${4:-target/release/mergesmith}
[ "${4:-}" ] || cargo build --release --quiet
mkdir -p "$dir"
[ -f "$dir/sd1.safetensors" ] || $bin synth --arch sd1 --size full --seed 1 -o "$dir/sd1.safetensors"
cat > "$dir/tokenizer.json" <<'JSON'
{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"Lowercase"},
 "pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
 "model":{"type":"WordLevel","vocab":{"!":0,"<unk>":1,"a":320,"cat":2368,"<|startoftext|>":49406,"<|endoftext|>":49407},"unk_token":"<unk>"}}
JSON
run() {
  /usr/bin/time -f "%e %M" $bin gen -m "$dir/sd1.safetensors" -p "a cat" --steps "$1" \
      --device "$device" --tokenizer "$dir/tokenizer.json" -o "$dir/out.png" --overwrite --json \
      2>&1 >/dev/null | tail -1
}
read -r one mem1 < <(run 1)
read -r many mem < <(run "$steps")
echo "gen 512x512, $device: 1 step ${one} s, $steps steps ${many} s, peak RSS $((mem / 1024)) MiB"
awk -v a="$one" -v b="$many" -v n="$steps" 'BEGIN { printf "seconds per step: %.2f\n", (b - a) / (n - 1) }'
