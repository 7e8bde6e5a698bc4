//! Resolving LoRA module names to checkpoint tensors.
//!
//! Module names are never parsed back into paths (underscores are ambiguous): a forward table
//! is built from the checkpoint's own keys, registering every spelling a LoRA file may use
//! for each weight: kohya's `lora_unet_` + LDM path or + diffusers path, `lycoris_`,
//! diffusers/PEFT dotted paths (`unet.`, `text_encoder.`, `text_encoder_2.`), the old
//! attention-processor spelling, and the text encoders' HF-CLIP names, including the three
//! row slices (q, k, v) of OpenCLIP's fused `in_proj_weight` (SD2, SDXL's second encoder).

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::arch::family::LoraDef;
pub use crate::arch::names::ldm_to_diffusers;
use crate::arch::names::{map_key, Part};
use crate::arch::{Component, Family};
use crate::checkpoint::Checkpoint;

/// A checkpoint weight a LoRA module changes, or a row slice of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The checkpoint key (`....weight`).
    pub key: String,
    /// Rows `start..end` of the key (q / k / v of a fused projection); `None` for all of it.
    pub rows: Option<(usize, usize)>,
    /// The module's rows are the key's with the two halves swapped (diffusers' (scale, shift)
    /// order of a 2-chunk modulation: Flux's and SD3's final layer, SD3's last context block).
    pub swap_halves: bool,
}

/// Module name -> target, for one checkpoint.
#[derive(Debug, Default, Clone)]
pub struct Targets {
    map: HashMap<String, Target>,
}

const UNET: &str = "model.diffusion_model.";

/// The LoRA module of a text-encoder weight (checkpoint `key`, mapped to `part` / HF-CLIP
/// `name` by [`map_key`]): its HF module path if it is an attention projection or MLP layer,
/// the kohya prefixes that name it (sd-scripts writes the first: `lora_te_` for SD1 / SD2,
/// `lora_te1_` / `lora_te2_` for SDXL's encoders) and the diffusers / PEFT prefix.
pub fn te_module<'a>(
    key: &str,
    part: Part,
    name: &'a str,
) -> Option<(&'a str, &'static [&'static str], &'static str)> {
    let module = name.strip_suffix(".weight")?;
    let projection = ["_proj", ".fc1", ".fc2"]
        .iter()
        .any(|s| module.ends_with(s));
    if !module.starts_with("text_model.encoder.layers.") || !projection {
        return None;
    }
    let (kohya, dotted) = te_prefixes(key, part)?;
    Some((module, kohya, dotted))
}

/// The kohya prefixes and the diffusers / PEFT prefix of a text encoder's modules.
fn te_prefixes(key: &str, part: Part) -> Option<(&'static [&'static str], &'static str)> {
    Some(match (part, key.starts_with("conditioner.")) {
        (Part::TextEncoder, false) => (&["lora_te_", "lora_te1_"], "text_encoder."),
        (Part::TextEncoder, true) => (&["lora_te1_"], "text_encoder."),
        (Part::TextEncoder2, _) => (&["lora_te2_"], "text_encoder_2."),
        _ => return None,
    })
}

/// A text encoder's layer norm as a module (LyCORIS norm modules: `w_norm`, `b_norm`), with
/// its prefixes as in [`te_module`].
fn te_norm_module<'a>(
    key: &str,
    part: Part,
    name: &'a str,
) -> Option<(&'a str, &'static [&'static str], &'static str)> {
    let module = name.strip_suffix(".weight")?;
    let norm = module.starts_with("text_model.encoder.layers.")
        && (module.ends_with(".layer_norm1") || module.ends_with(".layer_norm2"))
        || module == "text_model.final_layer_norm";
    if !norm {
        return None;
    }
    let (kohya, dotted) = te_prefixes(key, part)?;
    Some((module, kohya, dotted))
}

fn underscored(s: &str) -> String {
    s.replace('.', "_")
}

/// A weight of a family whose LoRA names are data, as a LoRA module: its path, the
/// spellings that name it (templates over `var`, the first is kohya's) and the path prefixes
/// trainers target by default.
pub struct DeclaredModule<'a> {
    /// The module path (after the text encoder's or the layout's prefix, without `.weight`).
    pub path: &'a str,
    /// Name templates.
    pub names: &'a [String],
    /// The template variable: `p` (native path) or `d` (diffusers path).
    pub var: char,
    /// Default training targets (path prefixes).
    pub targets: &'a [String],
    /// A native diffusion-model path, which the diffusers alias table also names.
    pub native: bool,
}

/// The LoRA module a 2-D / 4-D `.weight` of a declared family is: in a text encoder (by key
/// prefix) or in the diffusion model (native or diffusers-layout path); `None` for any other
/// key (VAE, 1-D tensors, ...).
pub fn declared_module<'a>(
    info: &'a crate::checkpoint::TensorInfo,
    family: Family,
    layout: &str,
    def: &'a LoraDef,
) -> Option<DeclaredModule<'a>> {
    let path = info.name.strip_suffix(".weight")?;
    if !matches!(info.shape.len(), 2 | 4) {
        return None;
    }
    if let Some(te) = def
        .text_encoders
        .iter()
        .find(|e| path.starts_with(&e.prefix))
    {
        return Some(DeclaredModule {
            path: &path[te.prefix.len()..],
            names: &te.names,
            var: 'p',
            targets: &te.targets,
            native: false,
        });
    }
    if family.component(&info.name) != Component::Unet {
        return None;
    }
    let path = family.data().strip_layout(path);
    Some(match def.diffusers_layout.as_deref() == Some(layout) {
        true => DeclaredModule {
            path,
            names: &def.diffusers_names,
            var: 'd',
            targets: &def.diffusers_targets,
            native: false,
        },
        false => DeclaredModule {
            path,
            names: &def.names,
            var: 'p',
            targets: &def.targets,
            native: true,
        },
    })
}

/// A name template (`{p}`/`{p_}` or `{d}`/`{d_}`, by `var`) filled with a module path.
pub fn fill(template: &str, path: &str, var: char) -> String {
    template
        .replace(&format!("{{{var}_}}"), &underscored(path))
        .replace(&format!("{{{var}}}"), path)
}

/// The diffusers path of native module path `p` by one alias (`native` -> `diffusers`, both
/// with an optional `{N}` block number).
fn alias_of(native: &str, diffusers: &str, p: &str) -> Option<String> {
    match native.split_once("{N}") {
        None => (native == p).then(|| diffusers.to_string()),
        Some((head, tail)) => {
            let n = p.strip_prefix(head)?.strip_suffix(tail)?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| diffusers.replace("{N}", n))
        }
    }
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
        let arch = crate::arch::detect(ck.tensors());
        if let Some(def) = arch.family.lora() {
            return Targets::declared(ck, arch.family, arch.layout, def);
        }
        let mut t = Targets::default();
        for info in ck.tensors() {
            let unet = info
                .name
                .strip_prefix(UNET)
                .and_then(|p| p.strip_suffix(".weight"));
            // 2-D / 4-D: linear and convolution weights; 1-D: norms (LyCORIS norm modules).
            if let Some(p) = unet.filter(|_| matches!(info.shape.len(), 1 | 2 | 4)) {
                t.unet(&info.name, p);
                continue;
            }
            for (part, name, src) in map_key(&info.name, &info.shape) {
                t.text_encoder(&info.name, part, &name, src.rows);
            }
        }
        t
    }

    fn add(&mut self, name: String, key: &str, rows: Option<(usize, usize)>) {
        self.insert(
            name,
            Target {
                key: key.to_string(),
                rows,
                swap_halves: false,
            },
        );
    }

    /// Registers a spelling; the first registration of a name wins.
    fn insert(&mut self, name: String, target: Target) {
        self.map.entry(name).or_insert(target);
    }

    /// The forward table of a family whose LoRA names are declared as data: every 2-D / 4-D
    /// weight of the diffusion model under each spelling of its path (and of its diffusers path, row
    /// slices of fused projections included), and every text-encoder weight under its
    /// encoder's spellings.
    fn declared(ck: &Checkpoint, family: Family, layout: &str, def: &LoraDef) -> Targets {
        let mut t = Targets::default();
        for info in ck.tensors() {
            let Some(m) = declared_module(info, family, layout, def) else {
                continue;
            };
            for n in m.names {
                t.add(fill(n, m.path, m.var), &info.name, None);
            }
            if !m.native {
                continue;
            }
            let width = info.shape[1..].iter().product::<usize>();
            for a in &def.diffusers {
                let Some(d) = alias_of(&a.p, &a.d, m.path) else {
                    continue;
                };
                let rows = a.rows.map(|[lo, hi]| (lo * width, hi * width));
                if rows.is_some_and(|(_, hi)| hi > info.shape[0]) {
                    continue;
                }
                // Swapped halves concern 2-chunk (shift, scale) modulations only.
                let swap_halves = a.swap_halves && info.shape[0] == 2 * width;
                for n in &def.diffusers_names {
                    let target = Target {
                        key: info.name.clone(),
                        rows,
                        swap_halves,
                    };
                    t.insert(fill(n, &d, 'd'), target);
                }
            }
        }
        t
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

    /// Registers a text-encoder weight under every spelling of its module (see
    /// [`te_module`]).
    fn text_encoder(&mut self, key: &str, part: Part, name: &str, rows: Option<(usize, usize)>) {
        let Some((module, kohya, dotted)) =
            te_module(key, part, name).or_else(|| te_norm_module(key, part, name))
        else {
            return;
        };
        for p in kohya {
            self.add(format!("{p}{}", underscored(module)), key, rows);
        }
        self.add(format!("{dotted}{module}"), key, rows);
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

/// The targets of a family's reference layout (families whose LoRA names are data), built
/// once: what a module name means without a checkpoint at hand.
static REFERENCE: LazyLock<Vec<(Family, Targets)>> = LazyLock::new(|| {
    Family::all()
        .filter(|f| f.lora().is_some())
        .filter_map(|f| {
            let entries = crate::arch::layout::release_keys(f, false).ok()?;
            let ck = Checkpoint::header_only(
                std::path::Path::new("reference layout"),
                entries.into_iter().map(|e| (e.key, e.dtype, e.shape)),
            );
            Some((f, Targets::of(&ck)))
        })
        .collect()
});

/// The family with LoRA names as data whose reference layout resolves the most of `modules`
/// (at least half of them), for files whose prefixes state no family (diffusers names are
/// shared by Flux and SD3).
pub fn resolving_family<'a>(modules: impl Iterator<Item = &'a str> + Clone) -> Option<Family> {
    let total = modules.clone().count();
    REFERENCE
        .iter()
        .map(|(f, t)| (*f, modules.clone().filter(|m| t.get(m).is_some()).count()))
        .filter(|(_, n)| *n > 0 && 2 * n >= total)
        .max_by_key(|(_, n)| *n)
        .map(|(f, _)| f)
}

/// The block of a LoRA module for `family` in its block list `list`: the module resolved
/// through the family's reference layout for families whose names are data, else the LBW
/// block [`module_block`] reads from the name.
pub fn module_block_in(family: Family, list: usize, module: &str) -> Option<String> {
    if family.lora().is_none() {
        return module_block(module);
    }
    let (_, targets) = REFERENCE.iter().find(|(f, _)| *f == family)?;
    family.block_in(list, &targets.get(module)?.key)
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
