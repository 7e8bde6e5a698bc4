#!/usr/bin/env python3
"""mergesmith's generation next to diffusers', same machine, same weights, one run.

For each family asked (SD1 at 512x512, SDXL at 1024x1024): a full-size synthetic checkpoint
(`mergesmith synth`, fp16), then
  - mergesmith: `gen --steps STEPS --json` on the CPU, whose `timings` give load, text
    encoding, seconds per sampling step (classifier-free guidance: the U-Net on a batch of 2)
    and VAE decoding;
  - diffusers: the same checkpoint converted with diffusers' single-file converters into
    `UNet2DConditionModel` / `AutoencoderKL` / `CLIPTextModel` in f32, timed for the same
    phases: load (file to models), text (prompt and negative prompt), STEPS U-Net calls on a
    batch of 2, one VAE decode.
Both on the CPU with every core (torch.set_num_threads(os.cpu_count())), in each precision
asked: f32, and bf16 (mergesmith's `--precision bf16`: bf16 operands, f32 accumulation, on AMX;
diffusers' U-Net and VAE cast to bfloat16, which torch runs through oneDNN, on AMX where the
CPU has it). The models run one after the other, never at once. Prints one table of seconds
and mergesmith / diffusers ratios (below 1: mergesmith is faster), and `--json FILE` writes
the figures.

Developer-run, in a throwaway venv with torch, diffusers and transformers:
    python -m venv /tmp/smv && /tmp/smv/bin/pip install torch diffusers transformers
    cargo build --release
    /tmp/smv/bin/python benches/gen_vs_diffusers.py [--arch sd1 sdxl] [--steps 2] \
        [--precision f32 bf16]
SDXL needs ~24 GB of RAM for the two f32 models in turn (10 GB U-Net each).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = {"sd1": 512, "sdxl": 1024}


def mergesmith(binary, model, steps, out, precision):
    cmd = [binary, "gen", "-m", model, "-p", "a cat", "--steps", str(steps),
           "-o", out, "--overwrite", "--json", "--precision", precision]
    r = subprocess.run(cmd, check=True, capture_output=True, text=True)
    t = json.loads(r.stdout)["timings"]
    return {"load": t["load"], "text": t["text"], "step": t["denoise"] / t["steps"],
            "decode": t["decode"]}


def ch(sd, k):
    return sd[k].shape[0]


def unet_of(sd, arch):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    p = "model.diffusion_model."
    if arch == "sd1":
        chans = tuple(ch(sd, f"{p}input_blocks.{i}.0.in_layers.2.weight") for i in (1, 4, 7, 10))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=chans, cross_attention_dim=768, attention_head_dim=8)
    else:
        chans = tuple(ch(sd, f"{p}input_blocks.{i}.0.in_layers.2.weight") for i in (1, 4, 7))
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=chans, cross_attention_dim=2048,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config))
    return unet.float().eval()


def vae_of(sd):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    chans = tuple(ch(sd, f"first_stage_model.encoder.down.{i}.block.0.conv1.weight")
                  for i in range(4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=chans)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config))
    return vae.float().eval()


def clip_of(sd):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    clip_sd = convert_ldm_clip_checkpoint(sd)
    clip_sd = {k: v for k, v in clip_sd.items() if "position_ids" not in k}
    if not any(k.startswith("text_model.") for k in clip.state_dict()):
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    clip.load_state_dict(clip_sd, strict=False)
    return clip.float().eval()


def diffusers(model, arch, steps, precision):
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[precision]
    out = {}
    t0 = time.perf_counter()
    sd = load_file(model)
    unet = unet_of(sd, arch).to(dtype)
    vae = vae_of(sd).to(dtype)
    clip = clip_of(sd) if arch == "sd1" else None
    del sd
    out["load"] = time.perf_counter() - t0
    s = SIZE[arch] // 8
    with torch.inference_mode():
        if clip is not None:
            ids = torch.full((1, 77), 49407, dtype=torch.long)
            ids[0, 0] = 49406
            t0 = time.perf_counter()
            ctx = torch.cat([clip(ids)[0], clip(ids)[0]]).to(dtype)
            out["text"] = time.perf_counter() - t0
            kw = {}
        else:
            ctx = torch.randn(2, 77, 2048).to(dtype)
            kw = {"added_cond_kwargs": {
                "text_embeds": torch.randn(2, 1280).to(dtype),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2).to(dtype)}}
            out["text"] = float("nan")
        x = torch.randn(2, 4, s, s).to(dtype)
        t0 = time.perf_counter()
        for i in range(steps):
            unet(x, torch.tensor(999.0 - i), encoder_hidden_states=ctx, **kw)
        out["step"] = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        vae.decode(x[:1] / 0.18215)
        out["decode"] = time.perf_counter() - t0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sd1"], choices=sorted(SIZE))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/mergesmith"))
    ap.add_argument("--dir", default=os.path.join(ROOT, "target/bench-gen"))
    ap.add_argument("--precision", nargs="+", default=["f32"], choices=["f32", "bf16"])
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    os.makedirs(args.dir, exist_ok=True)
    results = {}
    for arch in args.arch:
        model = os.path.join(args.dir, f"{arch}.safetensors")
        if not os.path.exists(model):
            subprocess.run([args.bin, "synth", "--arch", arch, "--size", "full", "--seed", "1",
                            "-o", model], check=True)
        for precision in args.precision:
            png = os.path.join(args.dir, f"{arch}-{precision}.png")
            ms = mergesmith(args.bin, model, args.steps, png, precision)
            df = diffusers(model, arch, args.steps, precision)
            results[f"{arch} {precision}"] = {"mergesmith": ms, "diffusers": df}
    print(f"CPU, {os.cpu_count()} threads, torch {torch.__version__}, "
          f"mean of {args.steps} steps (CFG: U-Net batch 2)")
    print(f"{'':19}{'mergesmith s':>14}{'diffusers s':>13}{'ratio':>8}")
    for name, r in results.items():
        for phase in ("load", "text", "step", "decode"):
            m, d = r["mergesmith"][phase], r["diffusers"][phase]
            ratio = m / d if d == d and d > 0 else float("nan")
            print(f"{name + ' ' + phase:19}{m:14.2f}{d:13.2f}{ratio:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
