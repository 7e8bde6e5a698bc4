#!/usr/bin/env bash
# Seconds per sampling step of a full-size synthetic model at its native size (SD1 512x512,
# SDXL 1024x1024; classifier-free guidance: two U-Net passes per step), on the CPU or a GPU.
# Runs `gen` with 1 and with STEPS steps; the difference over STEPS - 1 is the time per step
# (loading, text encoding and VAE decoding cancel out). The bundled CLIP tokenizer is used.
# Usage: [ARCH=sd1|sd2|sdxl] benches/gen.sh [steps] [device] [workdir] [binary]
set -euo pipefail
steps=${1:-3}
device=${2:-cpu}
dir=${3:-target/bench-gen}
cd "$(dirname "$0")/.."
bin=${4:-target/release/mergesmith}
[ "${4:-}" ] || cargo build --release --quiet
mkdir -p "$dir"
arch=${ARCH:-sd1}
model="$dir/$arch.safetensors"
[ -f "$model" ] || $bin synth --arch "$arch" --size full --seed 1 -o "$model"
run() {
  /usr/bin/time -f "%e %M" $bin gen -m "$model" -p "a cat" --steps "$1" \
      --device "$device" -o "$dir/out.png" --overwrite --json 2>&1 >/dev/null | tail -1
}
read -r one mem1 < <(run 1)
read -r many mem < <(run "$steps")
echo "gen $arch at its native size, $device: 1 step ${one} s, $steps steps ${many} s, peak RSS $((mem / 1024)) MiB"
awk -v a="$one" -v b="$many" -v n="$steps" 'BEGIN { printf "seconds per step: %.2f\n", (b - a) / (n - 1) }'
