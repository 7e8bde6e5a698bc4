#!/usr/bin/env python3
"""Parity check for the flow transformers: mergesmith's Flux (dev, schnell) and SD3 text to
image against diffusers' FluxPipeline and StableDiffusion3Pipeline on the same small synthetic
all-in-one checkpoints (developer-run, not part of CI).

What is shared: the checkpoint (`mergesmith synth --arch flux|sd3 --size small`), the prompt,
seed, steps, guidance and size, and the tokenizers' vocabularies (diffusers gets Hugging Face
tokenizers built from FLUX.1's / SD3's tokenizer files: pass --tokenizers DIR holding
`tokenizer_1/` (CLIP vocab.json + merges.txt) and `t5/tokenizer.json`). What is independent:
the reference draws the initial noise with torch's CPU generator, computes ComfyUI's `simple`
schedule itself, and runs diffusers' CLIP, T5, transformer, flow-matching Euler scheduler and
autoencoder, with weights converted from the ComfyUI keys by this script (diffusers' own Flux
converter assumes 3072-wide models). It prints, per model, the largest and the mean absolute
pixel difference (0-255).

ComfyUI (and SAI's reference code) give SD3 the *unprojected* CLIP-L pooled output, where
diffusers projects it; the reference sets CLIP-L's projection to the identity so that both
compute ComfyUI's conditioning.

Setup (a throwaway venv; nothing is installed into the repository):
    python -m venv /tmp/pv && /tmp/pv/bin/pip install torch diffusers transformers \
        safetensors sentencepiece protobuf pillow
    /tmp/pv/bin/python tools/parity_flow.py --tokenizers DIR [--binary target/debug/mergesmith]
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

PROMPT = "a red fox in the snow, (masterpiece:1.2)"
NEGATIVE = "blurry"
SEED = 42
STEPS = 4
SIZE = 64


def simple_sigmas(table, steps):
    """ComfyUI's `simple` scheduler over a model's sigma table (without the final 0)."""
    ss = len(table) / steps
    return [float(table[-(1 + int(x * ss))]) for x in range(steps)]


def flux_table(mu, n=10000):
    e = math.exp(mu)
    return [e / (e + (1 / (i / n) - 1)) for i in range(1, n + 1)]


def shift_table(shift, n=1000):
    return [shift * (i / n) / (1 + (shift - 1) * (i / n)) for i in range(1, n + 1)]


def strip(sd, prefix):
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def clip_model(sd, prefix, projection, act):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    w = strip(sd, prefix)
    tok = w["text_model.embeddings.token_embedding.weight"]
    layers = len({k.split(".")[3] for k in w if k.startswith("text_model.encoder.layers.")})
    cfg = CLIPTextConfig(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        intermediate_size=w["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(tok.shape[1] // 64, 1),
        max_position_embeddings=w["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=act,
        projection_dim=tok.shape[1],
        eos_token_id=49407,
        bos_token_id=49406,
        pad_token_id=1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    m = cls(cfg)
    if not any(k.startswith("text_model.") for k in m.state_dict()):
        # transformers 5 keeps the text model's weights at the top level
        w = {k.removeprefix("text_model."): v for k, v in w.items()}
    missing, unexpected = m.load_state_dict(w, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return m.eval()


def t5_model(sd, prefix):
    from transformers import T5Config, T5EncoderModel

    w = strip(sd, prefix)
    shared = w["shared.weight"]
    heads = w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    cfg = T5Config(
        vocab_size=shared.shape[0],
        d_model=shared.shape[1],
        d_kv=w["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=w["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in w if k.startswith("encoder.block.")}),
        num_heads=heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        layer_norm_epsilon=1e-6,
    )
    m = T5EncoderModel(cfg)
    w["encoder.embed_tokens.weight"] = shared
    m.load_state_dict(w, strict=True)
    return m.eval()


def vae_model(sd, prefix, scale, shift):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    w = {"first_stage_model." + k: v for k, v in strip(sd, prefix).items()}
    ch = w["first_stage_model.encoder.conv_in.weight"].shape[0]
    cfg = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[ch, 2 * ch, 4 * ch, 4 * ch],
        layers_per_block=2,
        latent_channels=w["first_stage_model.decoder.conv_in.weight"].shape[1],
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=scale,
        shift_factor=shift,
    )
    m = AutoencoderKL(**cfg)
    m.load_state_dict(convert_ldm_vae_checkpoint(w, cfg), strict=True)
    return m.eval()


def flux_transformer(sd):
    """diffusers' FluxTransformer2DModel from BFL keys (the mapping in data/families/flux.yaml)."""
    from diffusers import FluxTransformer2DModel

    w = strip(sd, "model.diffusion_model.")
    hidden, in_ch = w["img_in.weight"].shape
    head = w["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    double = len({k.split(".")[1] for k in w if k.startswith("double_blocks.")})
    single = len({k.split(".")[1] for k in w if k.startswith("single_blocks.")})
    guidance = "guidance_in.in_layer.weight" in w
    m = FluxTransformer2DModel(
        in_channels=in_ch,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head,
        num_attention_heads=hidden // head,
        joint_attention_dim=w["txt_in.weight"].shape[1],
        pooled_projection_dim=w["vector_in.in_layer.weight"].shape[1],
        guidance_embeds=guidance,
        axes_dims_rope=(head // 8, head * 7 // 16, head * 7 // 16),
    )
    out = {}

    def lin(src, dst):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in w:
                out[f"{dst}.{s}"] = w[f"{src}.{s}"]

    def split(src, dsts, sizes):
        for s in ("weight", "bias"):
            if f"{src}.{s}" not in w:
                continue
            parts = torch.split(w[f"{src}.{s}"], sizes, dim=0)
            for d, p in zip(dsts, parts):
                out[f"{d}.{s}"] = p

    for i in range(double):
        b, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        split(b + "img_attn.qkv", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], [hidden] * 3)
        split(b + "txt_attn.qkv", [t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], [hidden] * 3)
        lin(b + "img_attn.proj", t + "attn.to_out.0")
        lin(b + "txt_attn.proj", t + "attn.to_add_out")
        out[t + "attn.norm_q.weight"] = w[b + "img_attn.norm.query_norm.scale"]
        out[t + "attn.norm_k.weight"] = w[b + "img_attn.norm.key_norm.scale"]
        out[t + "attn.norm_added_q.weight"] = w[b + "txt_attn.norm.query_norm.scale"]
        out[t + "attn.norm_added_k.weight"] = w[b + "txt_attn.norm.key_norm.scale"]
        lin(b + "img_mod.lin", t + "norm1.linear")
        lin(b + "txt_mod.lin", t + "norm1_context.linear")
        lin(b + "img_mlp.0", t + "ff.net.0.proj")
        lin(b + "img_mlp.2", t + "ff.net.2")
        lin(b + "txt_mlp.0", t + "ff_context.net.0.proj")
        lin(b + "txt_mlp.2", t + "ff_context.net.2")
    mlp = w["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    for i in range(single):
        b, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        split(b + "linear1", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"], [hidden] * 3 + [mlp])
        lin(b + "linear2", t + "proj_out")
        out[t + "attn.norm_q.weight"] = w[b + "norm.query_norm.scale"]
        out[t + "attn.norm_k.weight"] = w[b + "norm.key_norm.scale"]
        lin(b + "modulation.lin", t + "norm.linear")
    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if guidance:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin("final_layer.linear", "proj_out")
    for s in ("weight", "bias"):
        shift, scale = w[f"final_layer.adaLN_modulation.1.{s}"].chunk(2, dim=0)
        out[f"norm_out.linear.{s}"] = torch.cat([scale, shift], dim=0)
    m.load_state_dict(out, strict=True)
    return m.eval()


def sd3_transformer(sd):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    w = strip(sd, "model.diffusion_model.")
    hidden = w["x_embedder.proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in w if k.startswith("joint_blocks.")})
    side = int(round(math.sqrt(w["pos_embed"].shape[1])))
    dual = tuple(sorted({int(k.split(".")[1]) for k in w if ".x_block.attn2." in k}))
    m = SD3Transformer2DModel(
        sample_size=side,
        patch_size=2,
        in_channels=w["x_embedder.proj.weight"].shape[1],
        num_layers=depth,
        attention_head_dim=hidden // depth,
        num_attention_heads=depth,
        joint_attention_dim=w["context_embedder.weight"].shape[1],
        caption_projection_dim=hidden,
        pooled_projection_dim=w["y_embedder.mlp.0.weight"].shape[1],
        out_channels=16,
        pos_embed_max_size=side,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if any(".ln_q." in k for k in w) else None,
    )
    conv = convert_sd3_transformer_checkpoint_to_diffusers(dict(w))
    m.load_state_dict(conv, strict=True)
    return m.eval()


def make_sd35_medium(src, dst, x_blocks=3):
    """SD3.5 Medium's shape on a small SD3 file: MMDiT-X blocks (a second image
    self-attention, 9-way modulation) in the first `x_blocks` blocks, RMS q/k norms in every
    attention."""
    from safetensors.torch import save_file

    sd = {k: v.float() for k, v in load_file(src).items()}
    p = "model.diffusion_model."
    hidden = sd[p + "x_embedder.proj.weight"].shape[0]
    depth = len([k for k in sd if k.endswith("x_block.attn.qkv.weight")])
    head = hidden // depth
    g = torch.Generator().manual_seed(11)

    def rnd(*shape, scale, offset=0.0):
        return (torch.rand(shape, generator=g) * 2 - 1) * scale + offset

    w = 1 / math.sqrt(hidden)
    for b in range(depth):
        for stream in ("x_block", "context_block"):
            for n in ("ln_q", "ln_k"):
                sd[f"{p}joint_blocks.{b}.{stream}.attn.{n}.weight"] = rnd(head, scale=0.05, offset=1.0)
        if b < x_blocks:
            a2 = f"{p}joint_blocks.{b}.x_block.attn2."
            sd[a2 + "qkv.weight"] = rnd(3 * hidden, hidden, scale=w)
            sd[a2 + "qkv.bias"] = rnd(3 * hidden, scale=0.02)
            sd[a2 + "proj.weight"] = rnd(hidden, hidden, scale=w)
            sd[a2 + "proj.bias"] = rnd(hidden, scale=0.02)
            for n in ("ln_q", "ln_k"):
                sd[a2 + n + ".weight"] = rnd(head, scale=0.05, offset=1.0)
            m = f"{p}joint_blocks.{b}.x_block.adaLN_modulation.1."
            sd[m + "weight"] = rnd(9 * hidden, hidden, scale=w)
            sd[m + "bias"] = rnd(9 * hidden, scale=0.02)
    save_file({k: v.contiguous() for k, v in sd.items()}, dst)


def reference(kind, model, toks, noise, sigmas, cfg, guidance):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    sd = load_file(model)
    vocab = (os.path.join(toks, "tokenizer_1", "vocab.json"), os.path.join(toks, "tokenizer_1", "merges.txt"))
    clip_tok = CLIPTokenizer(*vocab, model_max_length=77)
    clip_g_tok = CLIPTokenizer(*vocab, pad_token="!", model_max_length=77)
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(toks, "t5", "tokenizer.json"), model_max_length=512)
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    h = w = SIZE
    with torch.no_grad():
        if kind.startswith("flux"):
            from diffusers import FluxPipeline

            pipe = FluxPipeline(
                scheduler=sched,
                vae=vae_model(sd, "vae.", 0.3611, 0.1159),
                text_encoder=clip_model(sd, "text_encoders.clip_l.transformer.", False, "quick_gelu"),
                tokenizer=clip_tok,
                text_encoder_2=t5_model(sd, "text_encoders.t5xxl.transformer."),
                tokenizer_2=t5_tok,
                transformer=flux_transformer(sd),
            )
            lat = FluxPipeline._pack_latents(noise, 1, 16, h // 8, w // 8)
            img = pipe(
                prompt=PROMPT.replace("(masterpiece:1.2)", "masterpiece"),
                height=h,
                width=w,
                num_inference_steps=STEPS,
                sigmas=sigmas,
                guidance_scale=guidance,
                latents=lat,
                max_sequence_length=256,
                output_type="np",
            ).images[0]
        else:
            from diffusers import StableDiffusion3Pipeline

            l = clip_model(sd, "text_encoders.clip_l.transformer.", True, "quick_gelu")
            torch.nn.init.eye_(l.text_projection.weight)  # ComfyUI: CLIP-L pooled unprojected
            pipe = StableDiffusion3Pipeline(
                scheduler=sched,
                vae=vae_model(sd, "first_stage_model.", 1.5305, 0.0609),
                text_encoder=l,
                tokenizer=clip_tok,
                text_encoder_2=clip_model(sd, "text_encoders.clip_g.transformer.", True, "gelu"),
                tokenizer_2=clip_g_tok,
                text_encoder_3=t5_model(sd, "text_encoders.t5xxl.transformer."),
                tokenizer_3=t5_tok,
                transformer=sd3_transformer(sd),
            )
            img = pipe(
                prompt=PROMPT.replace("(masterpiece:1.2)", "masterpiece"),
                negative_prompt=NEGATIVE,
                height=h,
                width=w,
                num_inference_steps=STEPS,
                sigmas=sigmas,
                guidance_scale=cfg,
                latents=noise,
                max_sequence_length=77,
                output_type="np",
            ).images[0]
    return (img * 255).round().astype(np.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/debug/mergesmith")
    ap.add_argument("--tokenizers", required=True)
    a = ap.parse_args()
    cases = [
        ("flux-dev", ["--arch", "flux"], flux_table(1.15), 1.0, 3.5),
        ("flux-schnell", ["--arch", "flux", "--variant", "schnell"], [i / 1000 for i in range(1, 1001)], 1.0, 3.5),
        ("sd3", ["--arch", "sd3"], shift_table(3.0), 4.5, 3.5),
        ("sd3.5-medium", ["--arch", "sd3"], shift_table(3.0), 4.5, 3.5),
    ]
    print(f"{'model':<14} {'max |diff|':>10} {'mean |diff|':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, synth, table, cfg, guidance in cases:
            model = os.path.join(tmp, name + ".safetensors")
            subprocess.run([a.binary, "synth", *synth, "--size", "small", "--seed", "7", "-o", model], check=True, capture_output=True)
            if name == "sd3.5-medium":
                make_sd35_medium(model, model + ".x")
                os.replace(model + ".x", model)
            png = os.path.join(tmp, name + ".png")
            # Weights on the reference side are unweighted: mergesmith parses (x:1.2) itself,
            # so its prompt runs without weights too (emphasis none).
            subprocess.run(
                [a.binary, "gen", "--model", model, "-p", PROMPT, "-n", NEGATIVE, "--emphasis", "none", "--seed", str(SEED),
                 "--steps", str(STEPS), "--sampler", "euler", "--schedule", "simple", "--cfg", str(cfg),
                 "--guidance", str(guidance), "--width", str(SIZE), "--height", str(SIZE), "-o", png],
                check=True, capture_output=True,
            )
            ours = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
            gen = torch.Generator().manual_seed(SEED)
            noise = torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=gen)
            ref = reference(name, model, a.tokenizers, noise, simple_sigmas(table, STEPS), cfg, guidance)
            d = np.abs(ours - ref)
            print(f"{name:<14} {d.max():>10} {d.mean():>12.4f}")


if __name__ == "__main__":
    sys.exit(main())
