#!/usr/bin/env bash
# Usage: benches/identical.sh BINARY WORKDIR; then diff WORKDIR/sums.txt between two binaries
# (e.g. the previous release and this build): every output must be byte-identical.
# Runs the same SD1/SD2/SDXL work with two binaries and compares every output byte.
set -euo pipefail
bin=$1; dir=$2
rm -rf "$dir"; mkdir -p "$dir"; cp -r /work/main/recipes "$dir/"; rm -rf "$dir/recipes/models" "$dir/recipes/out" "$dir/recipes/.mergesmith"* 
cd "$dir"; m=recipes/models; mkdir -p $m
q() { "$@" >/dev/null 2>&1; }
q $bin synth --arch sd1 --seed 1 -o $m/base.safetensors
q $bin synth --base $m/base.safetensors --seed 2 --strength 0.2 -o $m/tuned.safetensors
q $bin synth --base $m/base.safetensors --seed 3 --strength 0.2 -o $m/other.safetensors
q $bin build recipes/example.yaml; q $bin build recipes/trials.yaml; q $bin build recipes/detail-transfer.yaml
q $bin lora synth -m $m/base.safetensors --rank 4 --conv-rank 2 -o $m/style.safetensors
q $bin build recipes/styled.yaml
for r in example trials detail-transfer styled sweep preview; do $bin plan recipes/$r.yaml --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(d, sort_keys=True))' > plan-$r.json || true; done
x=xl; mkdir -p $x
q $bin synth --arch sdxl --seed 4 -o $x/a.safetensors
q $bin synth --base $x/a.safetensors --seed 5 --strength 0.3 -o $x/b.safetensors
q $bin synth --base $x/a.safetensors --seed 6 --strength 0.3 -o $x/c.safetensors
q $bin synth --arch sd2 --seed 7 -o $x/s2a.safetensors
q $bin synth --base $x/s2a.safetensors --seed 8 --strength 0.3 -o $x/s2b.safetensors
q $bin synth --arch sd1 --variant inpainting --seed 9 -o $x/inp.safetensors
v20=$(python3 -c 'print(",".join(str(round(i/19,3)) for i in range(20)))')
v26=$(python3 -c 'print(",".join(str(round(i/25,3)) for i in range(26)))')
v110=$(python3 -c 'print(",".join(str(round((i%7)/7,3)) for i in range(110)))')
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha "$v20" -o $x/m20.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha "$v26" -o $x/m26.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha "$v110" -o $x/m110.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors -c $x/c.safetensors --mode add_difference --alpha 0.7 --elemental "IN04:attn1:0.2,M00::0.9" -o $x/ad.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha 0.4 --include --blocks "IN00-IN04 VAE" -o $x/inc.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha 0.4 --calcmode cosine_a -o $x/cos.safetensors
$bin merge -a $x/a.safetensors -b $x/b.safetensors --alpha 0.4 --adjust "1,2,3,4,5,6,7,8" -o $x/adj.safetensors
$bin merge -a $x/s2a.safetensors -b $x/s2b.safetensors --alpha "$v26" --prune -o $x/sd2.safetensors
$bin merge -a $x/inp.safetensors -b $m/tuned.safetensors --alpha 0.3 -o $x/inp-m.safetensors
$bin merge -a $m/base.safetensors -b $m/tuned.safetensors -c $m/other.safetensors --mode triple_sum --alpha GRAD_V --beta 0.2 -o $x/ts.safetensors
$bin lora extract -a $x/b.safetensors -b $x/a.safetensors --rank 4 -o $x/xl-lora.safetensors
$bin lora apply -m $x/a.safetensors --lora $x/xl-lora.safetensors:0.8 -o $x/baked.safetensors 2>&1 | tail -1 || true
$bin lora apply -m $x/a.safetensors --lora "$x/xl-lora.safetensors:0.8:0,1,1,1,1,0.5,0.5,0.5,0.5,1,0,0,0.3,0.3,0.3,1,1,1,1,1" -o $x/baked-lbw.safetensors 2>&1 | tail -1 || true
$bin lora synth -m $x/a.safetensors --rank 2 --seed 3 -o $x/xl-lora2.safetensors >/dev/null
$bin lora merge -l $x/xl-lora.safetensors:0.5 -l "$x/xl-lora2.safetensors:0.7:0,1,1,1,1,0.5,0.5,0.5,0.5,1,0,0,0.3,0.3,0.3,1,1,1,1,1" -o $x/merged-lora.safetensors 2>&1 | tail -1 || true
$bin lora merge -l $x/xl-lora.safetensors:0.5 -l $x/xl-lora2.safetensors:0.7 --mode svd --rank 3 -o $x/merged-lora-svd.safetensors 2>&1 | tail -1 || true
find recipes/out xl -name "*.safetensors" | sort | xargs sha256sum > sums.txt
