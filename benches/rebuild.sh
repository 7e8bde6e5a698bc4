#!/usr/bin/env bash
# Incremental-build benchmark, all in one run on two full-size synthetic models:
#   cold      first build of `blend` (26-value alpha) + save, empty cache, cold hash memo
#   noop      the same build again (nothing changed)
#   one-block the build after changing IN04's weight (0.5 -> 0.9x): recompute + write output
#   node-only the same change building only the merge node (target `blend`, no save)
#   copy      cp of one model over an existing file + sync (what writing the output costs)
# Every rebuild uses an IN04 value never built before, so each really rebuilds.
# Usage: benches/rebuild.sh [sd1|sdxl] [runs] [workdir] [copy|hardlink]
# Needs ~4x the model size of free disk (SD1 fp16: 2 GB per file).
set -euo pipefail
arch=${1:-sd1}
runs=${2:-3}
dir=${3:-target/bench-rebuild-$arch}
link=${4:-copy}
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin=$PWD/target/release/mergesmith
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -f "$dir/base.safetensors" ] || $bin synth --arch "$arch" --size full --seed 1 -o "$dir/base.safetensors"
[ -f "$dir/tuned.safetensors" ] || $bin synth --arch "$arch" --size full --seed 2 \
    --base "$dir/base.safetensors" -o "$dir/tuned.safetensors"
recipe() { # IN04 value
  local v
  if [ "$arch" = sdxl ]; then v="0.5, 0.5, 0.5, 0.5, $1, $(printf '0.5, %.0s' $(seq 14))0.5"
  else v="0.5, 0.5, 0.5, 0.5, 0.5, $1, $(printf '0.5, %.0s' $(seq 19))0.5"; fi
  cat > "$dir/recipe.yaml" <<YAML
version: 1
models:
  base: { path: base.safetensors }
  tuned: { path: tuned.safetensors }
nodes:
  blend: { merge: weight_sum, a: base, b: tuned, alpha: [$v] }
  release: { save: blend, to: out/merged.safetensors, overwrite: true, link: $link }
YAML
}
timed() { # label, command...: prints "label seconds" (the command's stdout goes to last.out)
  local label=$1 s e; shift
  sync
  s=$(date +%s.%N); "$@" > "$dir/last.out"; e=$(date +%s.%N)
  echo "$label" "$(echo "$e - $s" | bc)"
}
build() { $bin build "$dir/recipe.yaml" --json; }
cp "$dir/base.safetensors" "$dir/copy.safetensors" # the copy baseline replaces a file, as a save does
{
  for i in $(seq "$runs"); do
    rm -rf "$dir/cache" "$dir/out" "$dir/recipe.lock"
    recipe 0.5
    timed cold build
    timed noop build
    recipe "0.9$i"
    timed one-block build
    recipe "0.8$i"
    timed node-only $bin build "$dir/recipe.yaml" blend --json
    tr -d ' \n' < "$dir/last.out" | grep -o '"stored":[0-9]*,"reused":[0-9]*' | sed 's/^/blend: /' >&2
    timed copy sh -c "cp '$dir/base.safetensors' '$dir/copy.tmp' && mv '$dir/copy.tmp' '$dir/copy.safetensors' && sync"
  done
} > "$dir/times.txt"
rm -f "$dir/copy.safetensors"
awk '
  { t[$1] = t[$1] " " $2 }
  function median(s,   a, n, i, j, x) { n = split(s, a, " ");
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { x = a[i]; a[i] = a[j]; a[j] = x }
    return a[int((n + 1) / 2)] }
  END {
    for (k in t) { r[k] = median(t[k]); printf "%-9s median %7.2f s   runs:%s\n", k, r[k], t[k] }
    printf "one-block / cold = %.3f   node-only / cold = %.3f   noop / cold = %.4f   one-block / copy = %.2f\n",
      r["one-block"] / r["cold"], r["node-only"] / r["cold"], r["noop"] / r["cold"], r["one-block"] / r["copy"]
  }' "$dir/times.txt"
