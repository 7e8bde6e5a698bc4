//! LoRA and LyCORIS files: loading every common spelling, resolving module names to
//! checkpoint weights (`names`), reconstructing each module's weight change (`delta`) and
//! baking LoRAs into a checkpoint with per-block weights (`bake`, `blocks`).
//!
//! Spellings accepted (lora.md §1.4): kohya / LyCORIS (`X.lora_up.weight`, `X.lora_down.weight`,
//! `X.alpha`, also without `.weight`), PEFT (`X.lora_B.weight` / `X.lora_A.weight`, optionally
//! under `base_model.model.`), diffusers LoRACompatible layers (`X.lora.up.weight`), patched text
//! encoders (`X.lora_linear_layer.up.weight`) and old attention processors
//! (`X_lora.up.weight`); LyCORIS LoHa (`hada_*`), LoKr (`lokr_*`), IA3 (`weight` + `on_input`)
//! and full differences (`diff`, `diff_b`).

pub mod bake;
pub mod blocks;
pub mod delta;
pub mod extract;
pub mod merge;
pub mod names;
pub mod svd;
pub mod synth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// The adapter family of a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `lora_up` / `lora_down` (LoCon for convolutions, with `lora_mid` for Tucker).
    Lora,
    /// LyCORIS LoHa (Hadamard product of two low-rank products).
    Loha,
    /// LyCORIS LoKr (Kronecker product).
    Lokr,
    /// LyCORIS (IA)^3: a per-channel scale of the weight.
    Ia3,
    /// A full weight (and bias) difference.
    Full,
}

impl Kind {
    /// Display name.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Lora => "LoRA",
            Kind::Loha => "LoHa",
            Kind::Lokr => "LoKr",
            Kind::Ia3 => "IA3",
            Kind::Full => "Full",
        }
    }
}

/// Part suffixes and the canonical part names they stand for; longest match wins.
const PARTS: &[(&str, &str)] = &[
    (".lora_linear_layer.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    ("_lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_mid.weight", "mid"),
    (".lora_B.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_up", "up"),
    (".lora_down", "down"),
    (".lora_mid", "mid"),
    (".lora_magnitude_vector", "dora_scale"),
    (".dora_scale", "dora_scale"),
    (".alpha", "alpha"),
    (".scale", "scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".on_input", "on_input"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".weight", "weight"),
];

/// One module of a LoRA file: its name as written (prefixes such as PEFT's `base_model.model.`
/// removed) and the file's tensor name for each part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Module name (`lora_unet_...`, `unet.down_blocks...`, ...).
    pub name: String,
    /// Adapter family.
    pub kind: Kind,
    /// Canonical part name -> tensor name in the file.
    pub parts: BTreeMap<&'static str, String>,
}

/// An opened LoRA file.
pub struct LoraFile {
    /// The file.
    pub path: PathBuf,
    /// Its tensors.
    pub ck: Checkpoint,
    /// Its modules, sorted by name.
    pub modules: Vec<Module>,
}

impl std::fmt::Debug for LoraFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraFile")
            .field("path", &self.path)
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// Splits a tensor name into (module, canonical part).
fn split_part(name: &str) -> Option<(&str, &'static str)> {
    PARTS
        .iter()
        .filter_map(|(suffix, part)| name.strip_suffix(suffix).map(|m| (m, *part)))
        .max_by_key(|(m, _)| std::cmp::Reverse(m.len()))
}

fn kind_of(module: &str, parts: &BTreeMap<&'static str, String>) -> Result<Kind> {
    let has = |p: &str| parts.contains_key(p);
    let kind = if has("up") && has("down") {
        Kind::Lora
    } else if has("hada_w1_a") && has("hada_w1_b") && has("hada_w2_a") && has("hada_w2_b") {
        Kind::Loha
    } else if (has("lokr_w1") || has("lokr_w1_a") && has("lokr_w1_b"))
        && (has("lokr_w2") || has("lokr_w2_a") && has("lokr_w2_b"))
    {
        Kind::Lokr
    } else if has("weight") && has("on_input") {
        Kind::Ia3
    } else if has("diff") || has("diff_b") {
        Kind::Full
    } else {
        let found: Vec<&str> = parts.keys().copied().collect();
        return Err(Error::Invalid(format!(
            "module `{module}` has parts {found:?}, which make no known adapter \
             (LoRA up/down, LoHa hada_*, LoKr lokr_*, IA3 weight+on_input, full diff)"
        )));
    };
    Ok(kind)
}

impl LoraFile {
    /// Opens a LoRA file and groups its tensors into modules.
    pub fn open(path: &Path) -> Result<LoraFile> {
        let ck = Checkpoint::open(path)?;
        let mut grouped: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
        for t in ck.tensors() {
            let Some((module, part)) = split_part(&t.name) else {
                return Err(Error::Invalid(format!(
                    "{}: tensor `{}` is not part of a LoRA module",
                    path.display(),
                    t.name
                )));
            };
            let module = module.strip_prefix("base_model.model.").unwrap_or(module);
            grouped
                .entry(module.to_string())
                .or_default()
                .insert(part, t.name.clone());
        }
        let modules = grouped
            .into_iter()
            .map(|(name, parts)| {
                let kind = kind_of(&name, &parts)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                Ok(Module { name, kind, parts })
            })
            .collect::<Result<Vec<_>>>()?;
        if modules.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no LoRA modules in this file",
                path.display()
            )));
        }
        Ok(LoraFile {
            path: path.to_path_buf(),
            ck,
            modules,
        })
    }

    /// A part of a module as f32 values with its shape.
    pub fn part(&self, m: &Module, part: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(name) = m.parts.get(part) else {
            return Ok(None);
        };
        let t = self.ck.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.clone(),
        })?;
        let values = crate::convert::to_f32(t.dtype, &self.ck.data(t))?;
        Ok(Some((values, t.shape.clone())))
    }
}

/// What `inspect` says about a LoRA file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Modules per adapter type (LoRA, LoHa, ...).
    pub types: BTreeMap<String, usize>,
    /// The architecture its module names point to.
    pub architecture: String,
    /// Modules per rank.
    pub ranks: BTreeMap<usize, usize>,
    /// Modules per alpha value (as written).
    pub alphas: BTreeMap<String, usize>,
    /// Modules with DoRA magnitudes.
    pub dora: usize,
    /// Modules per LBW block (`-`: outside every block).
    pub blocks: BTreeMap<String, usize>,
    /// Convolution modules (LoCon) among them.
    pub conv_modules: usize,
}

impl LoraFile {
    /// Counts types, ranks, alphas and modules per block.
    pub fn summary(&self) -> Summary {
        let mut s =
            Summary {
                architecture: if self.modules.iter().any(|m| {
                    m.name.starts_with("lora_te2_") || m.name.starts_with("text_encoder_2.")
                }) {
                    "SDXL".into()
                } else if self.modules.iter().any(|m| m.name.starts_with("lora_te_")) {
                    "SD1.x / SD2.x".into()
                } else {
                    "not stated by the module names (U-Net only)".into()
                },
                ..Summary::default()
            };
        let shape = |m: &Module, p: &str| {
            m.parts
                .get(p)
                .and_then(|n| self.ck.get(n))
                .map(|t| t.shape.clone())
        };
        for m in &self.modules {
            *s.types.entry(m.kind.label().into()).or_default() += 1;
            let rank = match m.kind {
                Kind::Lora => shape(m, "down").map(|s| s[0]),
                Kind::Loha => shape(m, "hada_w1_b").map(|s| s[0]),
                Kind::Lokr => shape(m, "lokr_w2_b")
                    .or_else(|| shape(m, "lokr_w1_b"))
                    .map(|s| s[0]),
                Kind::Ia3 | Kind::Full => None,
            };
            if let Some(r) = rank {
                *s.ranks.entry(r).or_default() += 1;
            }
            if let Ok(Some((a, _))) = self.part(m, "alpha") {
                if let Some(a) = a.first() {
                    *s.alphas.entry(a.to_string()).or_default() += 1;
                }
            }
            s.dora += usize::from(m.parts.contains_key("dora_scale"));
            let conv = shape(m, "down")
                .or_else(|| shape(m, "hada_w1_b"))
                .is_some_and(|s| s.len() == 4 && s[2] * s[3] > 1);
            s.conv_modules += usize::from(conv);
            let block = names::module_block(&m.name).unwrap_or_else(|| "-".into());
            *s.blocks.entry(block).or_default() += 1;
        }
        s
    }
}

/// One module of a LoRA to write in kohya format: the shape of the weight it changes and its
/// factors (`up [out, rank]`, `down [rank, rest]`, row-major).
#[derive(Debug, Clone)]
pub struct Factored {
    /// Module name.
    pub name: String,
    /// Shape of the weight it changes (2-D linear or 4-D convolution).
    pub shape: Vec<usize>,
    /// `[out, rank]`.
    pub up: Vec<f32>,
    /// `[rank, rest]`.
    pub down: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// The alpha to record.
    pub alpha: f32,
}

/// Writes modules as a kohya LoRA file (`lora_up` `[out, r(, 1, 1)]`, `lora_down`
/// `[r, in(, kh, kw)]`, `alpha`) in `dtype` (temp file, fsync, rename).
pub fn write_kohya(
    out: &Path,
    modules: &[Factored],
    dtype: crate::dtype::DType,
    metadata: &BTreeMap<String, String>,
    overwrite: bool,
) -> Result<()> {
    use crate::checkpoint::writer::{SafetensorsWriter, TensorSpec};
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    let alphas: Vec<[f32; 1]> = modules.iter().map(|m| [m.alpha]).collect();
    for (m, alpha) in modules.iter().zip(&alphas) {
        let (mut up_s, mut down_s) = (vec![m.shape[0], m.rank], vec![m.rank]);
        if m.shape.len() == 4 {
            up_s.extend([1, 1]);
            down_s.extend_from_slice(&m.shape[1..]);
        } else {
            down_s.push(m.shape[1..].iter().product());
        }
        tensors.push((format!("{}.lora_up.weight", m.name), up_s, &m.up));
        tensors.push((format!("{}.lora_down.weight", m.name), down_s, &m.down));
        tensors.push((format!("{}.alpha", m.name), vec![], alpha));
    }
    let specs = tensors
        .iter()
        .map(|(n, s, _)| TensorSpec {
            name: n.clone(),
            dtype,
            shape: s.clone(),
        })
        .collect();
    let writer = SafetensorsWriter::create(out, specs, metadata, overwrite)?;
    for (n, _, v) in &tensors {
        writer.write(n, &crate::convert::from_f32(v, dtype)?)?;
    }
    writer.finish()?;
    Ok(())
}
