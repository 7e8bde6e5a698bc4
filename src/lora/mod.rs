//! LoRA and LyCORIS files: loading every common spelling, resolving module names to
//! checkpoint weights (`names`), reconstructing each module's weight change (`delta`) and
//! baking LoRAs into a checkpoint with per-block weights (`bake`, `blocks`).
//!
//! Spellings accepted (lora.md §1.4): kohya / LyCORIS (`X.lora_up.weight`, `X.lora_down.weight`,
//! `X.alpha`, also without `.weight`), PEFT (`X.lora_B.weight` / `X.lora_A.weight`, optionally
//! under `base_model.model.`), diffusers LoRACompatible layers (`X.lora.up.weight`), patched text
//! encoders (`X.lora_linear_layer.up.weight`) and old attention processors
//! (`X_lora.up.weight`); LyCORIS LoHa (`hada_*`), LoKr (`lokr_*`), IA3 (`weight` + `on_input`),
//! GLoRA (`a1`/`a2`/`b1`/`b2`), OFT and BOFT (`oft_blocks`, 3-D / 4-D), full differences
//! (`diff`, `diff_b`) and norm modules (`w_norm`, `b_norm`).

pub mod bake;
pub mod blocks;
pub mod delta;
pub mod extract;
pub mod merge;
pub mod meta;
pub mod names;
pub mod svd;
pub mod synth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::arch::Family;
use crate::checkpoint::Checkpoint;
use crate::dtype::DType;
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
    /// LyCORIS GLoRA: `b1·b2 + W·a1·a2` (reads the weight).
    Glora,
    /// OFT: block-diagonal orthogonal rotations of the weight's output rows.
    Oft,
    /// LyCORIS BOFT: butterfly products of block-diagonal rotations (4-D `oft_blocks`).
    Boft,
    /// LyCORIS norm module (`train_norm`): a difference of a norm layer's weight and bias.
    Norm,
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
            Kind::Glora => "GLoRA",
            Kind::Oft => "OFT",
            Kind::Boft => "BOFT",
            Kind::Norm => "Norm",
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
    (".oft_blocks", "oft_blocks"),
    (".rescale", "rescale"),
    (".a1.weight", "a1"),
    (".a2.weight", "a2"),
    (".b1.weight", "b1"),
    (".b2.weight", "b2"),
    (".diff_b", "diff_b"),
    (".w_norm", "w_norm"),
    (".b_norm", "b_norm"),
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
    } else if has("a1") && has("a2") && has("b1") && has("b2") {
        Kind::Glora
    } else if has("oft_blocks") {
        Kind::Oft
    } else if has("diff") || has("diff_b") {
        Kind::Full
    } else if has("w_norm") {
        Kind::Norm
    } else {
        let found: Vec<&str> = parts.keys().copied().collect();
        return Err(Error::Invalid(format!(
            "module `{module}` has parts {found:?}, which make no known adapter \
             (LoRA up/down, LoHa hada_*, LoKr lokr_*, IA3 weight+on_input, GLoRA a1/a2/b1/b2, OFT / BOFT oft_blocks, full diff, norm w_norm)"
        )));
    };
    Ok(kind)
}

impl LoraFile {
    /// Opens a LoRA file and groups its tensors into modules.
    pub fn open(path: &Path) -> Result<LoraFile> {
        Self::from_checkpoint(Checkpoint::open(path)?)
    }

    /// Groups the tensors of an opened LoRA (a file, or a stored node result) into modules.
    pub fn from_checkpoint(ck: Checkpoint) -> Result<LoraFile> {
        let path = ck.path().to_path_buf();
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
                let mut kind = kind_of(&name, &parts)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
                let blocks_dims = parts
                    .get("oft_blocks")
                    .and_then(|n| ck.get(n))
                    .map(|t| t.shape.len());
                if kind == Kind::Oft && blocks_dims == Some(4) {
                    kind = Kind::Boft;
                }
                Ok(Module { name, kind, parts })
            })
            .collect::<Result<Vec<_>>>()?;
        if modules.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: no LoRA modules in this file",
                path.display()
            )));
        }
        Ok(LoraFile { path, ck, modules })
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
        let data = self.ck.data(t);
        let values = match t.dtype {
            // Flags and counts some trainers store as integers (IA3's `on_input`).
            DType::Bool | DType::U8 => data.iter().map(|b| *b as f32).collect(),
            DType::I8 => data.iter().map(|b| *b as i8 as f32).collect(),
            DType::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            DType::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            _ => crate::convert::to_f32(t.dtype, &data)?,
        };
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
    /// The family the LoRA was made for, when its module names say so: a family whose LoRA
    /// names are data (`made_for`, e.g. Flux's `lora_unet_double_blocks_`), SDXL's second
    /// encoder (`lora_te2_`), or SD1/SD2's single one (`lora_te_`).
    pub fn family(&self) -> Option<Family> {
        let any = |p: &[&str]| {
            self.modules
                .iter()
                .any(|m| p.iter().any(|p| m.name.starts_with(p)))
        };
        let declared = Family::all().find(|f| {
            f.lora().is_some_and(|d| {
                self.modules
                    .iter()
                    .any(|m| d.made_for.iter().any(|p| m.name.starts_with(p.as_str())))
            })
        });
        if declared.is_some() {
            declared
        } else if any(&["lora_te2_", "text_encoder_2."]) {
            Some(Family::builtin("sdxl"))
        } else if any(&["lora_te_"]) {
            Some(Family::builtin("sd1"))
        } else {
            None
        }
    }

    /// The family the module names state ([`LoraFile::family`]), else the family with LoRA
    /// names as data whose reference layout resolves most of them.
    pub fn family_or_resolved(&self) -> Option<Family> {
        self.family()
            .or_else(|| names::resolving_family(self.modules.iter().map(|m| m.name.as_str())))
    }

    /// Counts types, ranks, alphas and modules per block.
    pub fn summary(&self) -> Summary {
        let family = self.family_or_resolved();
        let mut s = Summary {
            architecture: match family {
                Some(f) if f.lora().is_some() => f.label().into(),
                Some(f) if f.xl_lora() => "SDXL".into(),
                Some(_) => "SD1.x / SD2.x".into(),
                None => "not stated by the module names (U-Net only)".into(),
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
                Kind::Glora => shape(m, "b1").map(|s| s[0].min(s[1])),
                Kind::Ia3 | Kind::Oft | Kind::Boft | Kind::Full | Kind::Norm => None,
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
            let block = match family {
                Some(f) => names::module_block_in(f, 0, &m.name),
                None => names::module_block(&m.name),
            }
            .unwrap_or_else(|| "-".into());
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

/// The tensors of modules in kohya layout (`lora_up` `[out, r(, 1, 1)]`, `lora_down`
/// `[r, in(, kh, kw)]`, `alpha` `[]`): (name, shape) in file order, given (name, weight
/// shape, rank) per module.
pub fn kohya_layout<'a>(
    modules: impl IntoIterator<Item = (&'a str, &'a [usize], usize)>,
) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (name, shape, rank) in modules {
        let (mut up, mut down) = (vec![shape[0], rank], vec![rank]);
        if shape.len() == 4 {
            up.extend([1, 1]);
            down.extend_from_slice(&shape[1..]);
        } else {
            down.push(shape[1..].iter().product());
        }
        out.push((format!("{name}.lora_up.weight"), up));
        out.push((format!("{name}.lora_down.weight"), down));
        out.push((format!("{name}.alpha"), vec![]));
    }
    out
}

/// A LoRA made by mergesmith (extracted or merged), ready to be written in kohya format.
#[derive(Debug, Clone)]
pub struct KohyaLora {
    /// The modules, sorted by name.
    pub modules: Vec<Factored>,
    /// File metadata (`ss_*`, `modelspec.*`).
    pub metadata: BTreeMap<String, String>,
}

impl KohyaLora {
    /// Tensor specs of the file in `dtype`.
    pub fn specs(&self, dtype: crate::dtype::DType) -> Vec<crate::checkpoint::writer::TensorSpec> {
        kohya_layout(
            self.modules
                .iter()
                .map(|m| (m.name.as_str(), m.shape.as_slice(), m.rank)),
        )
        .into_iter()
        .map(|(name, shape)| crate::checkpoint::writer::TensorSpec { name, dtype, shape })
        .collect()
    }

    /// Writes every tensor the writer expects (the writer was made from [`Self::specs`]).
    pub fn write_into(
        &self,
        writer: &crate::checkpoint::writer::SafetensorsWriter,
        dtype: crate::dtype::DType,
    ) -> Result<()> {
        for (name, values) in self.tensors() {
            if writer.expects(&name) {
                writer.write(&name, &crate::convert::from_f32(values, dtype)?)?;
            }
        }
        Ok(())
    }

    /// Every tensor of the file: (name, f32 values), the factors and alpha of each module.
    fn tensors(&self) -> impl Iterator<Item = (String, &[f32])> {
        self.modules.iter().flat_map(|m| {
            [
                ("lora_up.weight", m.up.as_slice()),
                ("lora_down.weight", m.down.as_slice()),
                ("alpha", std::slice::from_ref(&m.alpha)),
            ]
            .map(|(suffix, values)| (format!("{}.{suffix}", m.name), values))
        })
    }

    /// The file's bytes in `dtype` (canonical layout, as [`Self::write`] and the cache write
    /// them).
    fn file_bytes(&self, dtype: crate::dtype::DType) -> Result<(Vec<u8>, usize)> {
        let specs = self.specs(dtype);
        let lay = crate::checkpoint::writer::layout(&specs, &self.metadata)?;
        let head = lay.header.len();
        let total = lay.ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let mut bytes = lay.header;
        bytes.resize(head + total, 0);
        // `layout`'s ranges follow the specs, which name the tensors in `tensors` order.
        let at: BTreeMap<&str, (usize, usize)> = specs
            .iter()
            .map(|t| t.name.as_str())
            .zip(lay.ranges.iter().copied())
            .collect();
        for (name, values) in self.tensors() {
            let (lo, hi) = at[name.as_str()];
            bytes[head + lo..head + hi].copy_from_slice(&crate::convert::from_f32(values, dtype)?);
        }
        Ok((bytes, head))
    }

    /// Records the hashes the additional-networks extension identifies a LoRA by, of the file
    /// this LoRA is written as in `dtype`: `sshs_model_hash` (SHA-256 of everything after the
    /// header) and `sshs_legacy_hash` (of the 64 KiB at offset 1 MiB, 8 hex digits). Both are
    /// fixed-length, so the header has one length before and after. Where the header itself
    /// reaches the legacy window (over 1 MiB of metadata) no value can describe the file
    /// containing it: that hash is left out, with a warning.
    pub fn stamp_addnet_hashes(
        &mut self,
        dtype: crate::dtype::DType,
        warnings: &mut Vec<String>,
    ) -> Result<()> {
        let (model, legacy) = ("sshs_model_hash", "sshs_legacy_hash");
        self.metadata.insert(model.into(), "0".repeat(64));
        self.metadata.insert(legacy.into(), "0".repeat(8));
        let (bytes, head) = self.file_bytes(dtype)?;
        let data = crate::hashing::hash_bytes(&bytes[head..]).sha256;
        self.metadata.insert(model.into(), data);
        if head > 0x100000 {
            self.metadata.remove(legacy);
            warnings.push(format!(
                "the metadata is {head} bytes, past the 1 MiB where sshs_legacy_hash starts: left out"
            ));
        } else {
            let l = crate::hashing::hash_bytes(&bytes).legacy;
            self.metadata.insert(legacy.into(), l);
        }
        Ok(())
    }

    /// Writes the LoRA to `out` (temp file, fsync, rename).
    pub fn write(&self, out: &Path, dtype: crate::dtype::DType, overwrite: bool) -> Result<()> {
        let writer = crate::checkpoint::writer::SafetensorsWriter::create(
            out,
            self.specs(dtype),
            &self.metadata,
            overwrite,
        )?;
        self.write_into(&writer, dtype)?;
        writer.finish()?;
        Ok(())
    }
}
