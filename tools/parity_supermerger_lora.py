#!/usr/bin/env python3
"""LoRA merges side by side with SuperMerger's own code (developer-run, not part of CI).

Imports SuperMerger's scripts/mergers/pluslora.py (web UI modules stubbed as in
parity_supermerger.py; LoRA files load from their path) and runs its merge_lora_models (the
"same dims" factor sum, with and without "same to Strength"), merge_lora_models_dim (remake
dimension) and extract_two (extract from two LoRAs) next to `mergesmith lora merge` on
synthetic kohya SD1 LoRAs, with the same 26-value block weights. Prints per case how many
tensors were compared, how many differ in any bit, and the largest relative difference (for
the SVD merge: of the products up·down, which the factorization's signs do not change).

Setup: as parity_supermerger.py (venv /tmp/smv, SuperMerger checkout).
Run:
    cargo build --release
    /tmp/smv/bin/python tools/parity_supermerger_lora.py --supermerger /tmp/supermerger \
        --bin target/release/mergesmith
"""

import argparse
import os
import shutil
import sys
import tempfile
import types
from unittest import mock

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parity_supermerger import run, stub_webui  # noqa: E402


def stub_more():
    """What pluslora.py imports beyond mergers.py."""
    for name in ["gradio", "scripts.kohyas.extract_lora_from_models", "scripts.A1111.networks",
                 "scripts.mergers.components", "modules.extra_networks"]:
        sys.modules[name] = mock.MagicMock()
    lu = mock.MagicMock()
    lu.git_tag = lambda: "v1.10"
    sys.modules["modules.launch_utils"] = lu
    sys.modules["modules"].launch_utils = lu
    sys.modules["modules"].extra_networks = sys.modules["modules.extra_networks"]


def rel(x, y):
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))


def compare(theirs, ours, product=False):
    n = bits = 0
    worst = 0.0
    if product:
        names = sorted({k[: k.rfind(".lora_up")] for k in theirs if ".lora_up" in k})
        for m in names:
            up, down = f"{m}.lora_up.weight", f"{m}.lora_down.weight"
            if up not in ours:
                continue
            def prod(sd):
                u, d = sd[up].double(), sd[down].double()
                return (u.flatten(1) @ d.flatten(1)) * (float(sd[f"{m}.alpha"]) / d.shape[0])
            a, b = prod(ours), prod(theirs)
            n += 1
            if not torch.equal(a, b):
                bits += 1
                worst = max(worst, rel(a, b))
        return n, bits, worst
    for k, t in theirs.items():
        if k not in ours:
            continue
        n += 1
        u = ours[k].float()
        t = t.float()
        if not torch.equal(u, t):
            bits += 1
            worst = max(worst, rel(u, t))
    return n, bits, worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--supermerger", required=True)
    ap.add_argument("--bin", default="target/release/mergesmith")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    d = tempfile.mkdtemp(prefix="parity-sm-lora-")
    shutil.copytree(os.path.join(a.supermerger, "scripts"), os.path.join(d, "scripts"))
    stub_webui()
    stub_more()
    sys.path.insert(0, d)
    import scripts.mergers.pluslora as pl  # noqa: E402

    model = f"{d}/model.safetensors"
    run([binary, "synth", "--arch", "sd1", "--dtype", "fp16", "--seed", "1", "-o", model])
    loras = {}
    for name, seed, rank in [("A", 1, 4), ("B", 2, 4)]:
        p = f"{d}/{name}.safetensors"
        run([binary, "lora", "synth", "-m", model, "--rank", str(rank), "--seed", str(seed),
             "-o", p])
        # Different alphas, so the √(alpha / alpha₀) rescaling is exercised.
        sd = load_file(p)
        for k in sd:
            if k.endswith(".alpha"):
                sd[k] = torch.tensor(2.0 if name == "A" else 8.0)
        from safetensors.torch import save_file
        save_file(sd, p)
        loras[name] = p
    va = [round(0.2 + 0.03 * i, 3) for i in range(26)]
    vb = [round(-0.7 + 0.05 * i, 3) for i in range(26)]
    spec = lambda name, v: f"{loras[name]}:1:{','.join(map(str, v))}"  # noqa: E731

    print("| case | tensors | bits differ | largest relative difference |")
    print("|---|---|---|---|")
    out = f"{d}/out.safetensors"
    for label, sets in [("kohya (same dims)", []), ("kohya, same to Strength", ["same to Strength"])]:
        theirs = pl.merge_lora_models([loras["A"], loras["B"]], [va, vb], sets, False, "float", "cpu")
        cmd = [binary, "lora", "merge", "--mode", "kohya", "-l", spec("A", va), "-l", spec("B", vb),
               "-o", out, "--overwrite", "--json"]
        if sets:
            cmd.append("--same-to-strength")
        run(cmd)
        n, bits, worst = compare(theirs, load_file(out))
        print(f"| {label} | {n} | {bits} | {worst:.2e} |")
    # The clamp bounds both factors by the 99th percentile of their signed values, which
    # depends on the signs the SVD happens to give its singular vectors (LAPACK's and faer's
    # differ), so only the sum and weighting are comparable: with the clamp off in both (here
    # torch.quantile answers +inf; mergesmith takes --clamp-quantile 1).
    real_quantile = torch.quantile
    for clamp in [0.99, 1.0]:
        pl.CLAMP_QUANTILE = clamp
        torch.quantile = real_quantile if clamp < 1 else (lambda *a, **k: torch.tensor(float("inf")))
        for label, sets in [("remake dimension 4", []),
                            ("remake dimension 4, same to Strength", ["same to Strength"])]:
            theirs = pl.merge_lora_models_dim([loras["A"], loras["B"]], [va, vb], 4, sets, "cpu",
                                              "float")
            cmd = [binary, "lora", "merge", "--mode", "svd", "--rank", "4", "--clamp-quantile",
                   str(clamp), "-l", spec("A", va), "-l", spec("B", vb), "-o", out, "--overwrite",
                   "--json"]
            if sets:
                cmd.append("--same-to-strength")
            run(cmd)
            n, bits, worst = compare(theirs, load_file(out), product=True)
            print(f"| {label}, clamp {'off' if clamp == 1 else clamp} (products) | {n} | {bits} "
                  f"| {worst:.2e} |")
    torch.quantile = real_quantile
    for alpha, beta, gamma in [(0.5, 0.5, 1.0), (0.3, 0.2, 1.5)]:
        ea = pl.merge_lora_models([loras["A"]], [va], [], False, "float", "cpu")
        eb = pl.merge_lora_models([loras["B"]], [vb], [], False, "float", "cpu")
        theirs = pl.extract_two(ea, eb, alpha, beta, gamma)
        run([binary, "lora", "merge", "--mode", "extract", "--alpha", str(alpha), "--beta",
             str(beta), "--gamma", str(gamma), "-l", spec("A", va), "-l", spec("B", vb),
             "-o", out, "--overwrite", "--json"])
        n, bits, worst = compare(theirs, load_file(out))
        print(f"| extract {alpha}/{beta}/{gamma} | {n} | {bits} | {worst:.2e} |")


if __name__ == "__main__":
    main()
