#!/usr/bin/env python3
"""Cross-check mergesmith's list merge methods against mergekit and sd-mecha (developer-run,
not part of CI).

Setup (once; torch is large):
    python3 -m venv /tmp/xvenv
    /tmp/xvenv/bin/pip install torch mergekit sd-mecha safetensors
Run:
    cargo build --release
    /tmp/xvenv/bin/python tools/crosscheck_methods.py --bin target/release/mergesmith

Makes a tiny fp32 SD1 base and three fine-tunes with `mergesmith synth`, merges them with
mergesmith's CLI, then runs the peers' own merge code (mergekit's merge methods and sd-mecha's
merge functions, called tensor by tensor on the same tensors) and prints, per method, the
largest absolute and relative difference over every merged tensor. For the random methods the
masks cannot match element by element (different generators), so it compares statistics:
the fraction of delta elements kept and the slope of (result - base) against the summed
weighted deltas.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorBatch, TensorGroup
from mergekit.merge_methods import slerp as mk_slerp
import sd_mecha.extensions.builtin.merge_methods.ties as mecha_ties
import sd_mecha.extensions.builtin.merge_methods.linear as mecha_linear


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)}\n{r.stderr}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/mergesmith")
    ap.add_argument("--strength", type=float, default=0.3)
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    d = tempfile.mkdtemp(prefix="crosscheck-")
    base = f"{d}/base.safetensors"
    run([binary, "synth", "--arch", "sd1", "--dtype", "fp32", "--seed", "1", "-o", base])
    fts = []
    for i in (1, 2, 3):
        p = f"{d}/ft{i}.safetensors"
        run([binary, "synth", "--base", base, "--seed", str(10 + i), "--strength",
             str(a.strength), "--rank", "0", "--dtype", "fp32", "-o", p])
        fts.append(p)
    B = load_file(base)
    X = [load_file(p) for p in fts]

    def ours(mode, deltas, params=(), weights=(), n=3, with_base=True):
        out = f"{d}/{mode}-{len(os.listdir(d))}.safetensors"
        cmd = [binary, "merge", "--mode", mode, "-o", out, "--json"]
        if with_base:
            cmd += ["--base", base]
        for p in fts[:n]:
            cmd += ["--delta" if deltas else "--model", p]
        for w in weights:
            cmd += ["--weight", str(w)]
        for p in params:
            cmd += ["-p", p]
        report = json.loads(run(cmd))
        kept = {k for keys in report["plan"]["kept"].values() for k in keys}
        t = load_file(out)
        return t, [k for k in t if k not in kept and t[k].is_floating_point()]

    rows = []

    def compare(name, peer, got, keys, fn):
        worst_abs = worst_rel = 0.0
        for k in keys:
            want = fn(k).to(torch.float64)
            diff = (got[k].to(torch.float64) - want).abs()
            worst_abs = max(worst_abs, diff.max().item())
            worst_rel = max(worst_rel, (diff / want.abs().clamp(min=1.0)).max().item())
        rows.append((name, peer, f"{worst_abs:.3g}", f"{worst_rel:.3g}", len(keys)))

    w = [1.0, 0.5, 0.75]
    gta = lambda m: registry.get(m)

    def group(k, n=3):
        return TensorGroup.from_tensors([B[k]] + [x[k] for x in X[:n]], base_index=0)

    def gta_params(n, **kw):
        p = {"weight": {i + 1: w[i] for i in range(n)}, "int8_mask": False}
        for key, v in kw.items():
            p[key] = {i + 1: v for i in range(n)} if key in ("density", "epsilon") else v
        return p

    # linear: mergekit `linear`.
    got, keys = ours("linear", False, weights=w, with_base=False)
    lin = registry.get("linear")
    compare("linear", "mergekit linear", got, keys, lambda k: lin.implementation(
        TensorBatch(tuple(x[k].unsqueeze(0) for x in X)),
        torch.tensor([w], dtype=torch.float32), True)[0])
    # task arithmetic.
    got, keys = ours("task_arithmetic", True, ["lambda=0.8"], w)
    compare("task_arithmetic", "mergekit task_arithmetic", got, keys, lambda k: gta("task_arithmetic").merge_group(
        group(k), **gta_params(3, normalize=False, rescale=False, **{"lambda": 0.8})))
    # TIES.
    got, keys = ours("ties", True, ["density=0.3"], w)
    compare("ties", "mergekit ties", got, keys, lambda k: gta("ties").merge_group(
        group(k), **gta_params(3, density=0.3, normalize=True, rescale=False, **{"lambda": 1.0})))
    got2, _ = ours("ties", True, ["density=0.3", "rescale=l1"], w)
    compare("ties rescale=l1", "mergekit ties rescale", got2, keys, lambda k: gta("ties").merge_group(
        group(k), **gta_params(3, density=0.3, normalize=True, rescale=True, **{"lambda": 1.0})))
    # sd-mecha's ties_sum votes by sign count by default: the documented difference.
    compare("ties (vs sd-mecha count vote)", "sd-mecha ties_sum", got, keys, lambda k: B[k] + mecha_ties.ties_sum.__wrapped__(
        *[(x[k] - B[k]) * wi for x, wi in zip(X, w)], k=0.3, vote_sgn=False))
    # slerp.
    got, keys = ours("slerp", False, ["t=0.3"], n=2, with_base=False)
    compare("slerp", "mergekit slerp", got, keys, lambda k: mk_slerp.slerp(
        torch.tensor([0.3]), X[0][k].unsqueeze(0), X[1][k].unsqueeze(0))[0])
    compare("slerp (vs sd-mecha)", "sd-mecha slerp", got, keys, lambda k: mecha_linear.slerp.__wrapped__(
        X[0][k], X[1][k], alpha=0.3))
    # model stock.
    got, keys = ours("model_stock", False)
    ms = registry.get("model_stock")
    compare("model_stock", "mergekit model_stock", got, keys, lambda k: ms.implementation(group(k), False))
    # geometric median (sd-mecha's defaults: eps 1e-6, 100 steps, ftol 1e-20).
    got, keys = ours("geometric_median", False, with_base=False)
    compare("geometric_median", "sd-mecha geometric_median", got, keys, lambda k: mecha_ties.geometric_median.__wrapped__(
        *[x[k] for x in X], eps=1e-6, maxiter=100, ftol=1e-20))

    print("| method | peer | max abs diff | max rel diff | tensors |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")

    # Random drops: statistics over every merged tensor.
    def stats(out_of, keys, n=3):
        kept = total = 0
        num = den = 0.0
        for k in keys:
            s = sum((x[k].double() - B[k].double()) * wi for x, wi in zip(X[:n], w))
            r = out_of(k).double() - B[k].double()
            nz = s != 0
            total += nz.sum().item()
            kept += (r[nz] != 0).sum().item()
            num += (r * s).sum().item()
            den += (s * s).sum().item()
        return kept / total, num / den

    print()
    print("| method | density | ours: nonzero fraction, slope | mergekit: nonzero fraction, slope |")
    print("|---|---|---|---|")
    for m, extra in [("dare", {}), ("dare_ties", {}), ("della", {"epsilon": 0.15}), ("della_linear", {"epsilon": 0.15})]:
        mk_name = {"dare": "dare_linear"}.get(m, m)
        got, keys = ours(m, True, ["density=0.4", "seed=5"], w)
        norm = m == "della"
        torch.manual_seed(0)
        peer = {k: gta(mk_name).merge_group(group(k), **gta_params(3, density=0.4, normalize=norm, rescale=True, **{"lambda": 1.0}, **extra)) for k in keys}
        o = stats(lambda k: got[k], keys)
        p = stats(lambda k: peer[k], keys)
        print(f"| {m} | 0.4 | {o[0]:.4f}, {o[1]:.4f} | {p[0]:.4f}, {p[1]:.4f} |")


if __name__ == "__main__":
    main()
