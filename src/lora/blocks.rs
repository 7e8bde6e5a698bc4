//! LoRA Block Weight (LBW, lora.md §6): one weight per block, given as 17 or 26 values for
//! SD1/SD2, 12 or 20 for SDXL, one of the family's block lists for the others (Flux: 61,
//! as LBW and SuperMerger name them, or ComfyUI's 63), or as a preset name; blocks a short vector leaves out get an
//! explicit fill value (0 by default, as the LBW extension and SuperMerger do).

use std::collections::BTreeMap;

use crate::arch::Family;
use crate::error::{Error, Result};

fn names(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in list.split(' ') {
        match part.split_once('-') {
            Some((a, b)) => {
                let prefix: String = a.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                let lo: usize = a[prefix.len()..].parse().unwrap_or(0);
                let hi: usize = b[prefix.len()..].parse().unwrap_or(0);
                out.extend((lo..=hi).map(|n| format!("{prefix}{n:02}")));
            }
            None => out.push(part.to_string()),
        }
    }
    out
}

/// The block names a vector of `len` values stands for, for a family.
pub fn block_ids(family: Family, len: usize) -> Option<Vec<String>> {
    let xl = family.xl_lora();
    let list = match (xl, len) {
        (false, 17) => "BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03-OUT11",
        (false, 26) | (true, 26) => "BASE IN00-IN11 M00 OUT00-OUT11",
        (true, 12) => "BASE IN04 IN05 IN07 IN08 M00 OUT00-OUT05",
        (true, 20) => "BASE IN00-IN08 M00 OUT00-OUT08",
        _ => return None,
    };
    Some(names(list))
}

/// The presets shipped with the LBW extension and SuperMerger (17-value form).
pub const PRESETS: &[(&str, &str)] = &[
    ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    (
        "ALL0.5",
        "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
    ),
];

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Per-block weights of one LoRA.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockWeights {
    /// Block name -> weight.
    pub weights: BTreeMap<String, f64>,
    /// Weight of blocks the vector does not list.
    pub fill: f64,
    /// The family the blocks are named for.
    #[serde(skip)]
    pub family: Family,
    /// Which of the family's block lists names them (0 for the SD families' LBW names;
    /// recorded only when not 0, so records made before it existed stay the same).
    #[serde(skip_serializing_if = "is_zero")]
    pub list: usize,
}

impl BlockWeights {
    /// Parses a preset name or comma-separated values for `family`: the SD families take
    /// LBW's 17/26 (SD1, SD2) or 12/20/26 (SDXL) values; families whose LoRA names are data
    /// take a vector as long as one of their block lists (Flux: SuperMerger's / LBW's 61,
    /// ComfyUI's 63).
    pub fn parse(text: &str, family: Family, fill: f64) -> Result<BlockWeights> {
        let t = text.trim();
        let values = PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(t))
            .map(|(_, v)| *v)
            .unwrap_or(t);
        let parsed: Vec<f64> = values
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                let near = crate::text::nearest(t, PRESETS.iter().map(|(n, _)| *n));
                Error::Invalid(format!(
                    "block weights `{t}`: not a preset ({}) nor comma-separated numbers{}",
                    PRESETS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", "),
                    near.map(|n| format!("; did you mean `{n}`?"))
                        .unwrap_or_default()
                ))
            })?;
        let (list, ids) = if family.lora().is_some() {
            let lists = family.lists();
            let found = lists
                .iter()
                .position(|l| l.slots.len() == parsed.len())
                .ok_or_else(|| {
                    let lens: Vec<String> = lists
                        .iter()
                        .map(|l| format!("{} ({})", l.slots.len(), l.id()))
                        .collect();
                    Error::Invalid(format!(
                        "block weights `{t}`: {} values; {} takes {}",
                        parsed.len(),
                        family.label(),
                        lens.join(" or ")
                    ))
                })?;
            (found, lists[found].slots.clone())
        } else {
            let ids = block_ids(family, parsed.len()).ok_or_else(|| {
                Error::Invalid(format!(
                    "block weights `{t}`: {} values; {} takes {}",
                    parsed.len(),
                    family.label(),
                    if family.xl_lora() {
                        "12 or 20 (or 26)"
                    } else {
                        "17 or 26"
                    }
                ))
            })?;
            (0, ids)
        };
        Ok(BlockWeights {
            weights: ids.into_iter().zip(parsed).collect(),
            fill,
            family,
            list,
        })
    }

    /// The weight of a key in `block` (keys outside every block keep weight 1).
    pub fn weight(&self, block: Option<&str>) -> f64 {
        match block {
            None => 1.0,
            Some(b) => self.weights.get(b).copied().unwrap_or(self.fill),
        }
    }

    /// The weight of a checkpoint key of `family` (the checkpoint's).
    pub fn weight_of_key(&self, family: Family, key: &str) -> f64 {
        self.weight(family.block_in(self.list, key).as_deref())
    }

    /// The weight of a LoRA module, by its name.
    pub fn weight_of_module(&self, module: &str) -> f64 {
        self.weight(crate::lora::names::module_block_in(self.family, self.list, module).as_deref())
    }
}
