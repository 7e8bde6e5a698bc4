//! `mergesmith inspect`: what a checkpoint is, what it holds, and its hashes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::arch::{self, Arch, Component};
use crate::checkpoint::{Checkpoint, Format};
use crate::error::Result;
use crate::hashing::{FileHashes, HashMemo, HashSource};

/// Count and size of a group of tensors.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: usize) {
        self.tensors += 1;
        self.bytes += bytes as u64;
    }
}

/// Per-block tally.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlockTally {
    /// Block name (`BASE`, `IN00`, ...).
    pub block: String,
    /// All tensors of the block.
    #[serde(flatten)]
    pub all: Tally,
    /// Tensors of the block that merges blend (the rest keep model A's values).
    pub mergeable: usize,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The file.
    pub path: PathBuf,
    /// File format.
    pub format: Format,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Detected architecture and why.
    pub arch: Arch,
    /// Quantized storage: ComfyUI scaled fp8 with its scaled weights, or the layout mergesmith
    /// does not read (none: plain storage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Totals.
    pub total: Tally,
    /// Per dtype.
    pub dtypes: BTreeMap<String, Tally>,
    /// Per component.
    pub components: BTreeMap<String, Tally>,
    /// Per MBW block, in block-list order.
    pub blocks: Vec<BlockTally>,
    /// Tensors that belong to no block (never merged, e.g. SDXL buffers).
    pub unblocked: Tally,
    /// `__metadata__`, with values that are JSON documents parsed.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Hashes (absent with `--no-hash`).
    pub hashes: Option<FileHashes>,
    /// Whether the hashes came from the memo.
    pub hash_source: Option<HashSource>,
    /// What the file is as a LoRA, when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::lora::Summary>,
    /// Every key with its classification (only with `--keys`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyRow>,
}

/// One key of the `--keys` listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyRow {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Component, block, fine block and mergeability.
    #[serde(flatten)]
    pub class: arch::KeyClass,
}

/// Inspects `path`; hashes through `memo` when given; lists every key when `with_keys`.
pub fn inspect(path: &Path, memo: Option<&HashMemo>, with_keys: bool) -> Result<Report> {
    let ckpt = Checkpoint::open(path)?;
    let arch = arch::detect(ckpt.tensors());
    let mut total = Tally::default();
    let mut dtypes: BTreeMap<String, Tally> = BTreeMap::new();
    let mut components: BTreeMap<Component, Tally> = BTreeMap::new();
    let block_names = arch.family.blocks();
    let mut blocks: Vec<BlockTally> = block_names
        .iter()
        .map(|b| BlockTally {
            block: b.clone(),
            all: Tally::default(),
            mergeable: 0,
        })
        .collect();
    let mut unblocked = Tally::default();
    let mut keys = Vec::new();
    for t in ckpt.tensors() {
        let bytes = t.byte_len();
        total.add(bytes);
        dtypes
            .entry(t.dtype.name().to_string())
            .or_default()
            .add(bytes);
        let class = arch::classify(arch.family, &t.name);
        components.entry(class.component).or_default().add(bytes);
        match class
            .block
            .as_deref()
            .and_then(|b| block_names.iter().position(|n| n == b))
        {
            Some(i) => {
                blocks[i].all.add(bytes);
                blocks[i].mergeable += usize::from(class.mergeable);
            }
            None => unblocked.add(bytes),
        }
        if with_keys {
            keys.push(KeyRow {
                name: t.name.clone(),
                dtype: t.dtype.name().to_string(),
                shape: t.shape.clone(),
                class,
            });
        }
    }
    let metadata = ckpt
        .metadata()
        .iter()
        .map(|(k, v)| {
            let parsed = match serde_json::from_str::<serde_json::Value>(v) {
                Ok(j @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) => j,
                _ => serde_json::Value::String(v.clone()),
            };
            (k.clone(), parsed)
        })
        .collect();
    let (hashes, hash_source) = match memo {
        Some(m) => {
            let (h, s) = m.hashes(path)?;
            (Some(h), Some(s))
        }
        None => (None, None),
    };
    let quantization = match crate::checkpoint::quant::Quant::of(&ckpt) {
        Ok(q) if q.is_scaled() => Some(format!(
            "scaled fp8: {} weights with per-tensor scales (`{}`)",
            q.scales.len(),
            q.markers.join("`, `")
        )),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    };
    let (format, file_bytes) = (ckpt.format(), ckpt.file_len());
    // A file of no known architecture may be a LoRA: read it as one, without reopening it.
    let lora = arch
        .family
        .is_generic()
        .then(|| {
            crate::lora::LoraFile::from_checkpoint(ckpt)
                .ok()
                .map(|f| f.summary())
        })
        .flatten();
    Ok(Report {
        path: path.to_path_buf(),
        format,
        file_bytes,
        arch,
        quantization,
        total,
        dtypes,
        components: components
            .into_iter()
            .map(|(c, t)| (c.name().to_string(), t))
            .collect(),
        blocks,
        unblocked,
        metadata,
        hashes,
        hash_source,
        lora,
        keys,
    })
}

/// Formats a byte count with binary units.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Human-readable rendering of a report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "file:          {}", r.path.display());
    let _ = writeln!(s, "format:        {:?}", r.format);
    let _ = writeln!(
        s,
        "size:          {} ({} bytes)",
        human_bytes(r.file_bytes),
        r.file_bytes
    );
    let _ = writeln!(s, "architecture:  {}", r.arch);
    let _ = writeln!(s, "  because:     {}", r.arch.rule);
    if let Some(q) = &r.quantization {
        let _ = writeln!(s, "  storage:     {q}");
    }
    if let Some(l) = r.arch.family.layout(r.arch.layout) {
        let lists: Vec<String> = r
            .arch
            .family
            .lists()
            .iter()
            .map(|l| format!("{} ({})", l.id(), l.slots.len()))
            .collect();
        let _ = writeln!(s, "  layout:      {} ({})", l.id, l.label);
        let _ = writeln!(s, "  blocks:      {}", lists.join(", "));
    }
    let _ = writeln!(
        s,
        "tensors:       {} ({})",
        r.total.tensors,
        human_bytes(r.total.bytes)
    );
    if let Some(l) = &r.lora {
        let join = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, n)| format!("{k} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ranks: BTreeMap<String, usize> =
            l.ranks.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let _ = writeln!(s, "\nLoRA:");
        let _ = writeln!(s, "  types:       {}", join(&l.types));
        let _ = writeln!(s, "  for:         {}", l.architecture);
        let _ = writeln!(s, "  ranks:       {}", join(&ranks));
        let _ = writeln!(s, "  alphas:      {}", join(&l.alphas));
        let _ = writeln!(
            s,
            "  conv (LoCon) modules: {}, DoRA modules: {}",
            l.conv_modules, l.dora
        );
        let _ = writeln!(s, "  modules per block: {}", join(&l.blocks));
    }
    let _ = writeln!(s, "\ndtypes:");
    for (d, t) in &r.dtypes {
        let _ = writeln!(
            s,
            "  {d:<8} {:>6} tensors  {:>12}",
            t.tensors,
            human_bytes(t.bytes)
        );
    }
    if r.lora.is_some() {
        // A LoRA's own keys have no checkpoint components or blocks: the LoRA section says it.
        return render_tail(r, s);
    }
    let _ = writeln!(s, "\ncomponents:");
    for (c, t) in &r.components {
        let _ = writeln!(
            s,
            "  {c:<8} {:>6} tensors  {:>12}",
            t.tensors,
            human_bytes(t.bytes)
        );
    }
    let _ = writeln!(s, "\nblocks ({}):", r.blocks.len());
    let _ = writeln!(
        s,
        "  {:<6} {:>7} {:>10} {:>12}",
        "block", "tensors", "mergeable", "size"
    );
    for b in &r.blocks {
        let _ = writeln!(
            s,
            "  {:<6} {:>7} {:>10} {:>12}",
            b.block,
            b.all.tensors,
            b.mergeable,
            human_bytes(b.all.bytes)
        );
    }
    if r.unblocked.tensors > 0 {
        let _ = writeln!(
            s,
            "  {:<6} {:>7} {:>10} {:>12}  (never merged)",
            "-",
            r.unblocked.tensors,
            0,
            human_bytes(r.unblocked.bytes)
        );
    }
    render_tail(r, s)
}

/// Metadata, hashes and the key listing.
fn render_tail(r: &Report, mut s: String) -> String {
    if !r.metadata.is_empty() {
        let _ = writeln!(s, "\nmetadata:");
        for (k, v) in &r.metadata {
            match v {
                serde_json::Value::String(text) => {
                    let _ = writeln!(s, "  {k}: {text}");
                }
                json => {
                    let pretty = serde_json::to_string_pretty(json).unwrap_or_default();
                    let _ = writeln!(s, "  {k}:");
                    for line in pretty.lines() {
                        let _ = writeln!(s, "    {line}");
                    }
                }
            }
        }
    }
    if let Some(h) = &r.hashes {
        let from = match r.hash_source {
            Some(HashSource::Memo) => " (memoized)",
            _ => "",
        };
        let _ = writeln!(s, "\nhashes{from}:");
        let _ = writeln!(s, "  blake3:        {}", h.blake3);
        let _ = writeln!(s, "  sha256:        {}", h.sha256);
        let _ = writeln!(s, "  AutoV2 (A1111 short hash): {}", h.autov2);
        let _ = writeln!(s, "  AutoV1 (A1111 legacy hash): {}", h.legacy);
    }
    if !r.keys.is_empty() {
        let _ = writeln!(s, "\nkeys:");
        for k in &r.keys {
            let shape: Vec<String> = k.shape.iter().map(|d| d.to_string()).collect();
            let _ = writeln!(
                s,
                "  {:<6} {:<6} {:<7} {:<5} {:<14} {}{}",
                k.class.component.name(),
                k.class.block.as_deref().unwrap_or("-"),
                k.class.fine.as_deref().unwrap_or(""),
                k.dtype,
                shape.join("x"),
                k.name,
                if k.class.mergeable {
                    ""
                } else {
                    "  (not merged)"
                }
            );
        }
    }
    s
}
