#!/usr/bin/env bash
# Remote-cache transfer benchmark: a full-size SD1 merge result (one ~2 GB fp16 pack) pushed
# to and pulled from a local S3 server (examples/s3_server.rs: s3s over s3s-fs on loopback)
# and a directory remote, against a baseline measured in the same run: copying the same
# model-sized file with cp and syncing it.
#   upload    `build --remote`: the merge, then the background upload (multipart, 16 MB
#             parts, 8 in flight); the figure is the upload's own time from the summary line
#   download  `pull` into an empty cache: download, blake3 verification, fsync, rename
# Usage: benches/remote.sh [workdir]   (needs ~10 GB of free disk)
set -euo pipefail
dir=${1:-target/bench-remote}
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin mergesmith --example s3_server
bin=$PWD/target/release/mergesmith
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -f "$dir/base.safetensors" ] || $bin synth --arch sd1 --size full --seed 1 -o "$dir/base.safetensors"
[ -f "$dir/tuned.safetensors" ] || $bin synth --arch sd1 --size full --seed 2 \
    --base "$dir/base.safetensors" -o "$dir/tuned.safetensors"
cat > "$dir/recipe.yaml" <<YAML
version: 1
models:
  base: { path: base.safetensors }
  tuned: { path: tuned.safetensors }
nodes:
  blend: { merge: weight_sum, a: base, b: tuned, alpha: 0.5 }
YAML
rm -rf "$dir/s3" "$dir/share" "$dir"/cache-*
port=$((20000 + RANDOM % 20000))
target/release/examples/s3_server "$dir/s3" $port > "$dir/s3.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 1
export AWS_ACCESS_KEY_ID=mergesmith AWS_SECRET_ACCESS_KEY=mergesmith-secret \
       AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
line() { grep '^remote ' "$1" | tail -1; }
bytes=$(stat -c %s "$dir/base.safetensors")
s=$(date +%s.%N); cp "$dir/base.safetensors" "$dir/copy.bin"; sync; e=$(date +%s.%N)
echo "baseline cp+sync of a same-size file: $(echo "$bytes / ($e - $s) / 1000000" | bc -l | xargs printf '%.0f') MB/s"
rm -f "$dir/copy.bin"
for remote in s3://mergesmith/bench "$dir/share"; do
  name=$([ "${remote#s3://}" != "$remote" ] && echo s3 || echo dir)
  $bin build "$dir/recipe.yaml" --cache "$dir/cache-$name-up" --remote "$remote" 2> "$dir/up.err" > /dev/null
  echo "$name upload:   $(line "$dir/up.err")"
  rm -rf "$dir/cache-$name-up"
  sync
  $bin pull "$dir/recipe.yaml" --cache "$dir/cache-$name-down" --remote "$remote" > "$dir/down.out"
  echo "$name download: $(line "$dir/down.out")"
  rm -rf "$dir/cache-$name-down" "$dir/s3/mergesmith/bench" "$dir/share"
done
