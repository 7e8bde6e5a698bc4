//! Resolving LoRA module names to checkpoint tensors.
//!
//! Module names are never parsed back into paths (underscores are ambiguous): a forward table
//! is built from the checkpoint's own keys, registering every spelling a LoRA file may use
//! for each weight: kohya's `lora_unet_` + LDM path or + diffusers path, `lycoris_`,
//! diffusers/PEFT dotted paths (`unet.`, `text_encoder.`, `text_encoder_2.`), the old
//! attention-processor spelling, and the text encoders' HF-CLIP names, including the three
//! row slices (q, k, v) of OpenCLIP's fused `in_proj_weight` (SD2, SDXL's second encoder).

use std::collections::HashMap;

use crate::checkpoint::Checkpoint;

/// A checkpoint weight a LoRA module changes, or a row slice of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The checkpoint key (`....weight`).
    pub key: String,
    /// Rows `start..end` of the key (q / k / v of a fused projection); `None` for all of it.
    pub rows: Option<(usize, usize)>,
}

/// Module name -> target, for one checkpoint.
#[derive(Debug, Default, Clone)]
pub struct Targets {
    map: HashMap<String, Target>,
}

const UNET: &str = "model.diffusion_model.";

/// The diffusers name of a ResNet sub-module of the LDM layout.
fn resnet_part(ldm: &str) -> Option<&'static str> {
    Some(match ldm {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "emb_layers.1" => "time_emb_proj",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    })
}

/// The diffusers module path of an LDM/SGM U-Net module path (both without the
/// `model.diffusion_model.` prefix and without `.weight`), or `None` when it has no
/// counterpart. The same rule serves SD1/SD2 (4 levels) and SDXL (3 levels).
pub fn ldm_to_diffusers(p: &str) -> Option<String> {
    let fixed = [
        ("input_blocks.0.0", "conv_in"),
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("label_emb.0.2", "add_embedding.linear_2"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ];
    for (l, d) in fixed {
        if p == l {
            return Some(d.to_string());
        }
    }
    let parts: Vec<&str> = p.splitn(4, '.').collect();
    let num = |s: &str| s.parse::<usize>().ok();
    match parts.as_slice() {
        ["input_blocks", n, "0", rest] => {
            let n = num(n)?.checked_sub(1)?;
            let (i, j) = (n / 3, n % 3);
            if j == 2 {
                (*rest == "op").then(|| format!("down_blocks.{i}.downsamplers.0.conv"))
            } else {
                Some(format!(
                    "down_blocks.{i}.resnets.{j}.{}",
                    resnet_part(rest)?
                ))
            }
        }
        ["input_blocks", n, "1", rest] => {
            let n = num(n)?.checked_sub(1)?;
            Some(format!("down_blocks.{}.attentions.{}.{rest}", n / 3, n % 3))
        }
        ["middle_block", k, rest @ ..] => {
            let rest = rest.join(".");
            match *k {
                "0" | "2" => Some(format!(
                    "mid_block.resnets.{}.{}",
                    num(k)? / 2,
                    resnet_part(&rest)?
                )),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                _ => None,
            }
        }
        ["output_blocks", n, k, rest] => {
            let n = num(n)?;
            let (i, j) = (n / 3, n % 3);
            match (*k, *rest) {
                ("0", r) => Some(format!("up_blocks.{i}.resnets.{j}.{}", resnet_part(r)?)),
                (_, "conv") => Some(format!("up_blocks.{i}.upsamplers.0.conv")),
                ("1", r) => Some(format!("up_blocks.{i}.attentions.{j}.{r}")),
                _ => None,
            }
        }
        _ => None,
    }
}

fn underscored(s: &str) -> String {
    s.replace('.', "_")
}

/// The processor spelling of old diffusers attention LoRAs: `attn1.processor.to_q`,
/// `to_out` without `.0`.
fn processor_variant(d: &str) -> Option<String> {
    let (head, last) = d.rsplit_once(".attn")?;
    let (n, tail) = last.split_once('.')?;
    let tail = tail.strip_suffix(".0").unwrap_or(tail);
    tail.starts_with("to_")
        .then(|| format!("{head}.attn{n}.processor.{tail}"))
}

impl Targets {
    /// The forward table of a checkpoint's LoRA-targetable weights.
    pub fn of(ck: &Checkpoint) -> Targets {
        let mut t = Targets::default();
        for info in ck.tensors() {
            let Some(path) = info.name.strip_suffix(".weight") else {
                if let Some(p) = info.name.strip_suffix(".attn.in_proj_weight") {
                    t.fused_qkv(&info.name, p, info.shape.first().copied().unwrap_or(0));
                }
                continue;
            };
            if !(info.shape.len() == 2 || info.shape.len() == 4) {
                continue;
            }
            if let Some(p) = path.strip_prefix(UNET) {
                t.unet(&info.name, p);
            } else {
                t.text_encoder(&info.name, path);
            }
        }
        t
    }

    fn add(&mut self, name: String, key: &str, rows: Option<(usize, usize)>) {
        self.map.entry(name).or_insert_with(|| Target {
            key: key.to_string(),
            rows,
        });
    }

    fn unet(&mut self, key: &str, p: &str) {
        self.add(format!("lora_unet_{}", underscored(p)), key, None);
        self.add(p.to_string(), key, None);
        if let Some(d) = ldm_to_diffusers(p) {
            self.add(format!("lora_unet_{}", underscored(&d)), key, None);
            self.add(format!("lycoris_{}", underscored(&d)), key, None);
            self.add(format!("unet.{d}"), key, None);
            if let Some(v) = processor_variant(&d) {
                self.add(format!("unet.{v}"), key, None);
                self.add(v, key, None);
            }
            self.add(d, key, None);
        }
    }

    /// Text-encoder weights: HF-CLIP layouts (SD1's encoder, SDXL's first) by path, OpenCLIP
    /// layouts (SD2's, SDXL's second) by their HF-CLIP equivalents.
    fn text_encoder(&mut self, key: &str, path: &str) {
        let path = path.replace(
            "cond_stage_model.transformer.encoder.",
            "cond_stage_model.transformer.text_model.encoder.",
        );
        if let Some(rest) = path.strip_prefix("cond_stage_model.transformer.") {
            self.te_names(key, rest, &["lora_te_", "lora_te1_"], "text_encoder.");
        } else if let Some(rest) = path.strip_prefix("conditioner.embedders.0.transformer.") {
            self.te_names(key, rest, &["lora_te1_"], "text_encoder.");
        } else if let Some((layer, part)) = path
            .split_once(".attn.")
            .or_else(|| path.split_once(".mlp."))
        {
            let Some((kohya, dotted, n)) = openclip_layer(layer) else {
                return;
            };
            let hf = match part {
                "out_proj" => "self_attn.out_proj",
                "c_fc" => "mlp.fc1",
                "c_proj" => "mlp.fc2",
                _ => return,
            };
            let rest = format!("text_model.encoder.layers.{n}.{hf}");
            self.te_names(key, &rest, &[kohya], dotted);
        }
    }

    /// Registers `text_model.encoder.layers.N.{self_attn.X_proj|mlp.fcK}` under kohya and
    /// dotted spellings.
    fn te_names(&mut self, key: &str, rest: &str, kohya: &[&str], dotted: &str) {
        if !rest.starts_with("text_model.encoder.layers.") {
            return;
        }
        for p in kohya {
            self.add(format!("{p}{}", underscored(rest)), key, None);
        }
        self.add(format!("{dotted}{rest}"), key, None);
    }

    /// OpenCLIP layers: SD2's encoder (`lora_te_`) and SDXL's second (`lora_te2_`), written in
    /// HF-CLIP terms: q/k/v are row slices of the fused `in_proj_weight`.
    fn fused_qkv(&mut self, key: &str, layer: &str, rows: usize) {
        let Some((kohya, dotted, n)) = openclip_layer(layer) else {
            return;
        };
        let d = rows / 3;
        for (i, x) in ["q", "k", "v"].into_iter().enumerate() {
            let rest = format!("text_model.encoder.layers.{n}.self_attn.{x}_proj");
            let slice = Some((i * d, (i + 1) * d));
            self.add(format!("{kohya}{}", underscored(&rest)), key, slice);
            self.add(format!("{dotted}{rest}"), key, slice);
        }
    }

    /// The target of a module name, if the checkpoint has it.
    pub fn get(&self, module: &str) -> Option<&Target> {
        self.map.get(module)
    }

    /// How many names are registered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// For an OpenCLIP resblock path (`...transformer.resblocks.N`): kohya prefix, dotted prefix,
/// layer number.
fn openclip_layer(layer: &str) -> Option<(&'static str, &'static str, usize)> {
    let (enc, n) = layer.rsplit_once(".transformer.resblocks.")?;
    let n: usize = n.parse().ok()?;
    match enc {
        "cond_stage_model.model" => Some(("lora_te_", "text_encoder.", n)),
        "conditioner.embedders.1.model" => Some(("lora_te2_", "text_encoder_2.", n)),
        _ => None,
    }
}

/// The LBW block of a LoRA module from its name alone (kohya, diffusers or LDM spelling):
/// text encoders are `BASE`; U-Net modules `INnn`, `M00` or `OUTnn` (lora.md §6.2); `None`
/// for modules outside every block (time embedding, conv_in/out...).
pub fn module_block(module: &str) -> Option<String> {
    let n = module.replace('.', "_");
    if ["lora_te", "text_encoder", "te_", "te1_", "te2_"]
        .iter()
        .any(|p| n.starts_with(p))
    {
        return Some("BASE".into());
    }
    let num_after = |key: &str| -> Option<usize> {
        let rest = &n[n.find(key)? + key.len()..];
        rest.split('_').next()?.parse().ok()
    };
    // (level, sub-block index; `None` for the level's down/upsampler).
    let level = |key: &str| -> Option<(usize, Option<usize>)> {
        let i = num_after(key)?;
        let rest = &n[n.find(key)? + key.len()..];
        let rest = rest.split_once('_')?.1;
        for kind in ["attentions_", "resnets_"] {
            if let Some(r) = rest.strip_prefix(kind) {
                return Some((i, r.split('_').next()?.parse().ok()));
            }
        }
        (rest.starts_with("downsamplers_") || rest.starts_with("upsamplers_")).then_some((i, None))
    };
    if n.contains("mid_block") || n.contains("middle_block") {
        Some("M00".into())
    } else if let Some(b) = num_after("input_blocks_") {
        Some(format!("IN{b:02}"))
    } else if let Some(b) = num_after("output_blocks_") {
        Some(format!("OUT{b:02}"))
    } else if let Some((i, j)) = level("down_blocks_") {
        Some(format!("IN{:02}", j.map_or(3 * i + 3, |j| 3 * i + j + 1)))
    } else if let Some((i, j)) = level("up_blocks_") {
        Some(format!("OUT{:02}", j.map_or(3 * i + 2, |j| 3 * i + j)))
    } else {
        None
    }
}
