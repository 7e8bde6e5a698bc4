#!/usr/bin/env python3
"""Parity check: mergesmith's text to image against the same computation done in torch with
diffusers' networks, k-diffusion's samplers and A1111's conventions, on a small synthetic SD1
model (developer-run, not part of CI).

What is shared: the checkpoint (`mergesmith synth --arch sd1 --size small`), a word-level
CLIP-style tokenizer (both sides read the same tokenizer.json), the prompt, seed, steps, CFG
and size. What is independent: the reference draws its noise with torch's own generator (A1111
"CPU": `torch.Generator().manual_seed(seed)`, the initial latent first, then one draw per
ancestral step), builds SD's sigma table in float32 as the CompVis model does, walks
k-diffusion's `sample_*` functions (or A1111's DDIM loop), and runs diffusers' CLIPTextModel,
UNet2DConditionModel and AutoencoderKL loaded from the checkpoint with diffusers' own
single-file converters. It prints, per sampler, the largest and the mean absolute pixel
difference (0-255).

Setup (a throwaway venv; nothing is installed into the repository):
    python -m venv /tmp/pv && /tmp/pv/bin/pip install torch diffusers transformers \
        safetensors scipy torchsde trampoline k-diffusion pillow
    /tmp/pv/bin/python tools/parity_diffusers.py [--binary target/release/mergesmith]

k-diffusion's package imports training-only modules at import time; this script loads its
`sampling.py` alone (with a stand-in for torchdiffeq, which the samplers used here never call).
"""

import argparse
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file


def load_kdiffusion_sampling():
    """k-diffusion's sampling module without the package's other imports."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        sys.exit("k-diffusion is not installed (pip install k-diffusion)")
    base = os.path.dirname(spec.origin)
    if importlib.util.find_spec("torchdiffeq") is None:
        stub = types.ModuleType("torchdiffeq")
        stub.odeint = None  # used only by sample_dpm_adaptive's ODE, not here
        sys.modules["torchdiffeq"] = stub
    pkg = types.ModuleType("kd")
    pkg.__path__ = [base]
    sys.modules["kd"] = pkg
    utils = types.ModuleType("kd.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules["kd.utils"] = utils
    spec = importlib.util.spec_from_file_location("kd.sampling", os.path.join(base, "sampling.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def toy_tokenizer(path):
    vocab = {"!": 0, "<unk>": 1, "a": 320, "cat": 2368, "photo": 1125, "of": 539,
             ",": 267, "blurry": 14439, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    with open(path, "w") as f:
        json.dump(tok, f)
    return vocab


def models(ckpt):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = load_file(ckpt)
    ch = lambda k: sd[k].shape[0]
    unet_ch = tuple(ch(f"model.diffusion_model.input_blocks.{i}.0.in_layers.2.weight") for i in (1, 4, 7, 10))
    ctx = sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=unet_ch, cross_attention_dim=ctx, attention_head_dim=8)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, unet.config))
    vae_ch = tuple(ch(f"first_stage_model.encoder.down.{i}.block.0.conv1.weight") for i in range(4))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_ch, scaling_factor=0.18215)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config))
    emb = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    layers = sum(1 for k in sd if k.startswith("cond_stage_model.") and k.endswith("layer_norm1.weight"))
    fc1 = sd["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=emb.shape[0], hidden_size=emb.shape[1], intermediate_size=fc1.shape[0],
        num_hidden_layers=layers, num_attention_heads=max(1, emb.shape[1] // 64),
        max_position_embeddings=77, hidden_act="quick_gelu"))
    clip_sd = convert_ldm_clip_checkpoint(sd)
    clip_sd = {k: v for k, v in clip_sd.items() if "position_ids" not in k}
    # Recent transformers name the text model's weights without the `text_model.` prefix.
    if not any(k.startswith("text_model.") for k in clip.state_dict()):
        clip_sd = {k.removeprefix("text_model."): v for k, v in clip_sd.items()}
    missing, unexpected = clip.load_state_dict(clip_sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        sys.exit(f"CLIP weights did not load: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return unet.eval(), vae.eval(), clip.eval()


def sd_sigmas():
    """SD's sigma table as the CompVis model holds it (alphas_cumprod in float32)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    return ((1 - ac) / ac) ** 0.5, ac


def reference(args, unet, vae, clip, ids, sampler, S):
    sigmas_table, alphas_cumprod = sd_sigmas()
    log_sigmas = sigmas_table.log()

    def sigma_to_t(sigma):
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(t):
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    with torch.no_grad():
        cond = clip(torch.tensor([ids["prompt"]])).last_hidden_state
        if "weights" in ids:
            # A1111's "Original" emphasis: weigh each token, restore the chunk's mean.
            w = torch.tensor(ids["weights"])[None, :, None]
            weighted = cond * w
            cond = weighted * (cond.mean() / weighted.mean())
        uncond = clip(torch.tensor([ids["negative"]])).last_hidden_state
        ctx = torch.cat([uncond, cond])

        def eps(x, t):
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            u, c = out.chunk(2)
            return u + args.cfg * (c - u)

        def denoiser(x, sigma, **kw):
            s = sigma.reshape(-1)[:1]
            c_in = 1 / (s ** 2 + 1) ** 0.5
            return x - s * eps(x * c_in, sigma_to_t(s))

        h, w = args.size // 8, args.size // 8
        gen = torch.Generator().manual_seed(args.seed)
        noise = torch.randn((1, 4, h, w), generator=gen)
        draw = lambda a=None, b=None: torch.randn((1, 4, h, w), generator=gen)
        n = args.steps
        if sampler == "ddim":
            # A1111's DDIM (sd_samplers_timesteps_impl.ddim, eta 0).
            ts = torch.clip(torch.arange(0, 1000, 1000 // n) + 1, 0, 999)
            a = alphas_cumprod[ts]
            a_prev = alphas_cumprod[torch.nn.functional.pad(ts[:-1], pad=(1, 0))]
            x = noise
            for i in range(len(ts) - 1):
                idx = len(ts) - 1 - i
                e = eps(x, ts[idx].float().reshape(1))
                pred_x0 = (x - (1 - a[idx]).sqrt() * e) / a[idx].sqrt()
                x = a_prev[idx].sqrt() * pred_x0 + (1 - a_prev[idx]).sqrt() * e
            latent = x
        else:
            schedule = {"dpm_2": "karras", "dpmpp_2m": "karras", "dpmpp_2s_ancestral": "karras",
                        "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential"}.get(sampler, "normal")
            steps = n + 1 if sampler == "dpm_2" else n
            smin, smax = sigmas_table[0].item(), sigmas_table[-1].item()
            if schedule == "karras":
                sig = S.get_sigmas_karras(steps, smin, smax)
            elif schedule == "exponential":
                sig = S.get_sigmas_exponential(steps, smin, smax)
            else:
                sig = S.append_zero(t_to_sigma(torch.linspace(999, 0, steps)))
            if sampler == "dpm_2":
                sig = torch.cat([sig[:-2], sig[-1:]])
            fn = getattr(S, "sample_" + sampler)
            kw = {}
            if "noise_sampler" in inspect.signature(fn).parameters:
                kw["noise_sampler"] = draw
            latent = fn(denoiser, noise * sig[0], sig, disable=True, **kw)
        img = vae.decode(latent / 0.18215).sample
        img = ((img + 1) * 127.5).clamp(0, 255).round()[0].permute(1, 2, 0).to(torch.uint8)
    return img.numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="target/release/mergesmith")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    S = load_kdiffusion_sampling()
    work = tempfile.mkdtemp(prefix="parity-")
    ckpt = os.path.join(work, "sd1.safetensors")
    subprocess.run([args.binary, "synth", "--arch", "sd1", "--size", "small", "--seed", "1",
                    "-o", ckpt], check=True, capture_output=True)
    tok = os.path.join(work, "tokenizer.json")
    vocab = toy_tokenizer(tok)
    prompt, negative = "a photo of a cat", "blurry"
    frame = lambda words: ([49406] + [vocab[w] for w in words.split()] + [49407] * 77)[:77]
    ids = {"prompt": frame(prompt), "negative": frame(negative)}
    unet, vae, clip = models(ckpt)
    ours = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm_2",
            "lms": "lms", "dpmpp_2s_ancestral": "dpmpp_2s_a", "dpmpp_2m": "dpmpp_2m",
            "ddim": "ddim"}
    print(f"SD1 small synthetic model, {args.size}x{args.size}, {args.steps} steps, CFG "
          f"{args.cfg}, seed {args.seed}, f32 on the CPU; pixel differences out of 255")
    print("| sampler | largest | mean |")
    print("|---|---|---|")
    cases = [(ref, name, prompt, ids) for ref, name in ours.items()]
    # A weighted prompt: A1111's parse and emphasis on one side, the plain formula on the other.
    weights = [1.0] * 77
    weights[5] = 1.3
    cases.append(("euler", "euler, `a photo of a (cat:1.3)`", "a photo of a (cat:1.3)",
                  dict(ids, weights=weights)))
    for ref_name, label, text, case_ids in cases:
        name = ours[ref_name]
        out = os.path.join(work, f"{name}.png")
        subprocess.run([args.binary, "gen", "-m", ckpt, "--tokenizer", tok, "-p", text,
                        "-n", negative, "--steps", str(args.steps), "--cfg", str(args.cfg),
                        "--seed", str(args.seed), "--width", str(args.size), "--sampler", name,
                        "-o", out, "--overwrite"], check=True, capture_output=True)
        mine = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
        ref = reference(args, unet, vae, clip, case_ids, ref_name, S).astype(np.int16)
        d = np.abs(mine - ref)
        print(f"| {label} | {d.max()} | {d.mean():.3f} |")


if __name__ == "__main__":
    main()
