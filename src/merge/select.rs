//! Per-key overrides: elemental merge, Include/Exclude and Adjust (supermerger.md §3.5, §4, §7).

use crate::arch::{Component, Family, KeyClass};
use crate::error::{Error, Result};

/// A set of block names, possibly inverted (`NOT ...`); empty = every block.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BlockSet {
    /// The listed blocks (ranges expanded).
    pub blocks: Vec<String>,
    /// `NOT`: every block except the listed ones.
    pub not: bool,
}

impl BlockSet {
    fn matches(&self, block: Option<&str>) -> bool {
        if self.blocks.is_empty() {
            return true;
        }
        let hit = block.is_some_and(|b| self.blocks.iter().any(|x| x == b));
        hit != self.not
    }
}

/// Element substrings, possibly inverted; empty = every key.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ElementSet {
    /// Substrings tested against the full key.
    pub elements: Vec<String>,
    /// `NOT`: keys containing none of them.
    pub not: bool,
}

impl ElementSet {
    fn matches(&self, key: &str) -> bool {
        if self.elements.is_empty() {
            return true;
        }
        self.elements.iter().any(|e| key.contains(e.as_str())) != self.not
    }
}

/// One `blocks:elements:ratio` entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ElementalEntry {
    /// Blocks it applies to.
    pub blocks: BlockSet,
    /// Keys it applies to.
    pub elements: ElementSet,
    /// The alpha it sets.
    pub ratio: EntryRatio,
}

/// An elemental entry's ratio.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum EntryRatio {
    /// A number.
    Value(f64),
    /// A dice token (`R`, `U`, `X`), drawn per key from the merge's dice seed.
    Dice(char),
}

/// Which block names elemental entries use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNames {
    /// The family's default list: 26 (SD), 20 (SDXL, real names), 61 (Flux).
    Standard,
    /// The family's second list: the 110 fine SDXL names, Flux's ComfyUI prefixes.
    Extended,
    /// SuperMerger's SDXL quirk (issue #468): an SDXL key is addressed by the 26-list name at
    /// its 20-list index (M00 is "IN09", OUT00 "IN10", OUT02 "M00", OUT03 "OUT00"...).
    /// Only for recipes written against that behaviour.
    ShiftedXl,
}

/// The merge blocks of a family's default list, in order (26 for SD1 / SD2, 20 for SDXL).
pub fn block_list(family: Family) -> &'static [String] {
    names(family, BlockNames::Standard)
}

/// The SD 26-block list (SuperMerger's `BLOCKID`), which its SDXL quirk addresses SDXL keys
/// with, and the list of scalar bases in sweeps.
pub fn sd_list() -> &'static [String] {
    Family::named("sd1")
        .expect("data/families/sd1.yaml")
        .blocks()
}

fn names(family: Family, names: BlockNames) -> &'static [String] {
    match names {
        BlockNames::Extended => family
            .lists()
            .get(1)
            .map_or(family.blocks(), |l| &l.slots[..]),
        BlockNames::Standard => family.blocks(),
        BlockNames::ShiftedXl => sd_list(),
    }
}

/// Parses space-separated block IDs with `X-Y` ranges (in list order, either direction)
/// and a leading `NOT`.
pub fn parse_blocks(text: &str, list: &[String]) -> Result<BlockSet> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let not = words.first() == Some(&"NOT");
    if not {
        words.remove(0);
    }
    let find = |w: &str| {
        list.iter()
            .position(|b| b.eq_ignore_ascii_case(w))
            .ok_or_else(|| {
                let near = crate::text::nearest(w, list.iter().map(|s| s.as_str()));
                Error::Invalid(format!(
                    "unknown block `{w}`{}; blocks are {} ... {}",
                    near.map(|n| format!(" (did you mean `{n}`?)"))
                        .unwrap_or_default(),
                    list[0],
                    list[list.len() - 1]
                ))
            })
    };
    let mut blocks = Vec::new();
    for w in words {
        let w = w.to_ascii_uppercase();
        match w.split_once('-') {
            Some((x, y)) if !x.is_empty() && !y.is_empty() => {
                let (i, j) = (find(x)?, find(y)?);
                let (lo, hi) = (i.min(j), i.max(j));
                blocks.extend(list[lo..=hi].iter().cloned());
            }
            _ => blocks.push(list[find(&w)?].clone()),
        }
    }
    Ok(BlockSet { blocks, not })
}

fn parse_elements(text: &str) -> ElementSet {
    let mut words: Vec<String> = text.split_whitespace().map(String::from).collect();
    let not = words.first().is_some_and(|w| w == "NOT");
    if not {
        words.remove(0);
    }
    ElementSet {
        elements: words,
        not,
    }
}

/// Parses elemental text: entries separated by commas or newlines, each
/// `blocks:elements:ratio`; pieces without exactly two `:` are ignored, as in SuperMerger.
pub fn parse_elemental(
    text: &str,
    family: Family,
    block_names: BlockNames,
) -> Result<Vec<ElementalEntry>> {
    let list = names(family, block_names);
    let mut out = Vec::new();
    for piece in text.replace('\n', ",").split(',') {
        let parts: Vec<&str> = piece.split(':').collect();
        let [blocks, elements, ratio] = parts[..] else {
            continue;
        };
        let ratio_text = ratio.trim();
        let ratio = match ratio_text {
            "R" | "U" | "X" => EntryRatio::Dice(ratio_text.chars().next().unwrap_or('R')),
            _ => EntryRatio::Value(
                ratio_text
                    .parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite())
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "elemental entry `{}`: ratio `{ratio_text}` is neither a number nor a dice token (R, U, X)",
                            piece.trim()
                        ))
                    })?,
            ),
        };
        out.push(ElementalEntry {
            blocks: parse_blocks(blocks, list)
                .map_err(|e| Error::Invalid(format!("elemental entry `{}`: {e}", piece.trim())))?,
            elements: parse_elements(elements),
            ratio,
        });
    }
    Ok(out)
}

/// The ratio elemental entries give a key (the last applicable entry wins), if any.
pub fn elemental_alpha(
    entries: &[ElementalEntry],
    family: Family,
    block_names: BlockNames,
    class: &KeyClass,
    key: &str,
) -> Option<EntryRatio> {
    let block = match block_names {
        BlockNames::Extended => class.fine.as_deref(),
        BlockNames::Standard => class.block.as_deref(),
        BlockNames::ShiftedXl => class
            .block
            .as_deref()
            .and_then(|b| family.blocks().iter().position(|n| n == b))
            .map(|i| sd_list()[i].as_str()),
    };
    entries
        .iter()
        .rfind(|e| e.blocks.matches(block) && e.elements.matches(key))
        .map(|e| e.ratio)
}

/// The blocks of an Include/Exclude list (standard names and ranges, `VAE`, `Adjust`, and
/// the family's fine names).
fn filter_blocks(words: &[&str], family: Family) -> Result<Vec<String>> {
    let mut special = Vec::new();
    let mut rest = Vec::new();
    for w in words {
        match w.to_ascii_uppercase().as_str() {
            "VAE" => special.push("VAE".to_string()),
            "ADJUST" => special.push("ADJUST".to_string()),
            u if names(family, BlockNames::Extended)
                .iter()
                .any(|b| b.eq_ignore_ascii_case(u)) =>
            {
                let list = names(family, BlockNames::Extended);
                special.extend(list.iter().find(|b| b.eq_ignore_ascii_case(u)).cloned())
            }
            _ => rest.push(*w),
        }
    }
    let mut set = parse_blocks(&rest.join(" "), names(family, BlockNames::Standard))?;
    set.blocks.extend(special);
    Ok(set.blocks)
}

/// Include / Exclude mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    /// Only matched keys are merged.
    Include,
    /// Matched keys keep model A.
    Exclude,
}

impl crate::text::Named for FilterMode {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("include", FilterMode::Include),
        ("exclude", FilterMode::Exclude),
    ];
}

/// The keys of the Adjust vector, in order of the slots that touch them.
pub const ADJUST_KEYS: [&str; 6] = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.0.0.bias",
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.out.0.bias",
    "model.diffusion_model.out.2.weight",
    "model.diffusion_model.out.2.bias",
];

/// Include/Exclude: which keys are selected.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeyFilter {
    /// Include or Exclude.
    pub mode: FilterMode,
    /// Block names (the family's list, fine SDXL names, `VAE`, `ADJUST`).
    pub blocks: Vec<String>,
    /// Element substrings.
    pub elements: Vec<String>,
}

impl KeyFilter {
    /// Parses `blocks` (space or comma separated, ranges allowed, plus `VAE` and `Adjust`;
    /// `NOT` takes every block, `VAE` and `Adjust` but the ones listed after it, added to any
    /// listed before it, as SuperMerger's XY plot adds an axis' `NOT` list to the merge's) and
    /// `elements` (comma or space separated substrings).
    pub fn parse(
        mode: FilterMode,
        blocks: &str,
        elements: &str,
        family: Family,
    ) -> Result<KeyFilter> {
        let words: Vec<&str> = blocks.split([',', ' ']).filter(|w| !w.is_empty()).collect();
        let (plain, negated) = match words.iter().position(|w| w.eq_ignore_ascii_case("NOT")) {
            Some(i) => (&words[..i], Some(&words[i + 1..])),
            None => (&words[..], None),
        };
        let mut set = filter_blocks(plain, family)?;
        if let Some(negated) = negated {
            let listed = filter_blocks(negated, family)?;
            set.extend(
                names(family, BlockNames::Standard)
                    .iter()
                    .cloned()
                    .chain(["VAE".to_string(), "ADJUST".to_string()])
                    .filter(|b| !listed.contains(b) && !set.contains(b))
                    .collect::<Vec<_>>(),
            );
        }
        Ok(KeyFilter {
            mode,
            blocks: set,
            elements: elements
                .split([',', ' '])
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect(),
        })
    }

    fn matched(&self, class: &KeyClass, key: &str) -> bool {
        let has = |b: &str| self.blocks.iter().any(|x| x == b);
        class.block.as_deref().is_some_and(has)
            || class
                .fine
                .as_deref()
                .is_some_and(|f| has(f) || self.elements.iter().any(|e| e == f))
            || (has("ADJUST") && ADJUST_KEYS.contains(&key))
            || self.elements.iter().any(|e| key.contains(e.as_str()))
            || (has("VAE") && class.component == Component::Vae)
    }

    /// Whether the key may be merged under this filter.
    pub fn allows(&self, class: &KeyClass, key: &str) -> bool {
        self.matched(class, key) == (self.mode == FilterMode::Include)
    }
}

/// What Adjust does to one merged tensor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdjustOp {
    /// Multiply every element.
    Scale(f32),
    /// Add per output channel (the 4 latent channels of `out.2.bias`).
    Add([f32; 4]),
}

/// The Adjust op for `key` from the 8-value vector IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3.
/// SuperMerger's numerics sum the colour terms in its order (`fineman` / `colorcalc`).
pub fn adjust_op(
    v: &[f64; 8],
    family: Family,
    key: &str,
    numerics: crate::merge::numerics::Numerics,
) -> Option<AdjustOp> {
    let i = ADJUST_KEYS.iter().position(|k| *k == key)?;
    let f = |x: f64| x as f32;
    Some(match i {
        0 => AdjustOp::Scale(f(1.0 - 0.01 * v[0])),
        1 => AdjustOp::Scale(f(1.0 + 0.02 * v[0])),
        2 => AdjustOp::Scale(f(1.0 - 0.01 * v[1])),
        3 => AdjustOp::Scale(f(1.0 + 0.02 * v[1])),
        4 => AdjustOp::Scale(f(1.0 - 0.01 * v[2])),
        _ if numerics == crate::merge::numerics::Numerics::Supermerger => {
            // [CONT*0.02] + per channel j: 0 + sum over i of (COLS[i][j] * v[4+i]) * 0.02.
            let cols: [[f64; 3]; 4] = if family.code().adjust.as_deref() == Some("sdxl") {
                [
                    [0.0, 0.0, 1.0],
                    [1.0, 0.0, 0.0],
                    [-1.0, -1.0, 0.0],
                    [-1.0, 1.0, 0.0],
                ]
            } else {
                [
                    [-1.0, 1.0 / 3.0, 2.0 / 3.0],
                    [1.0, 1.0, 0.0],
                    [0.0, -1.0, -1.0],
                    [1.0, 0.0, 1.0],
                ]
            };
            let ch =
                |j: usize| (0..4).fold(0.0f64, |acc, i| acc + cols[i][j] * v[4 + i] * 0.02) as f32;
            AdjustOp::Add([f(v[3] * 0.02), ch(0), ch(1), ch(2)])
        }
        _ => {
            let (c1, c2, c3) = if family.code().adjust.as_deref() == Some("sdxl") {
                (v[5] - v[6] - v[7], -v[6] + v[7], v[4])
            } else {
                (
                    -v[4] + v[5] + v[7],
                    v[4] / 3.0 + v[5] - v[6],
                    2.0 * v[4] / 3.0 - v[6] + v[7],
                )
            };
            AdjustOp::Add([f(0.02 * v[3]), f(0.02 * c1), f(0.02 * c2), f(0.02 * c3)])
        }
    })
}

/// Parses the Adjust text: 8 comma-separated numbers (blank = off).
pub fn parse_adjust(text: &str) -> Result<Option<[f64; 8]>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let v: Vec<f64> = text
        .split(',')
        .map(|x| x.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "adjust `{text}`: expected 8 comma-separated numbers"
            ))
        })?;
    let arr: [f64; 8] = v.try_into().map_err(|v: Vec<f64>| {
        Error::Invalid(format!(
            "adjust takes 8 values (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3), got {}",
            v.len()
        ))
    })?;
    Ok(arr.iter().any(|x| *x != 0.0).then_some(arr))
}

/// Applies an Adjust op to a whole merged tensor (in f32, before rounding).
pub fn apply_adjust(op: AdjustOp, values: &mut [f32]) {
    match op {
        AdjustOp::Scale(s) => values.iter_mut().for_each(|x| *x *= s),
        AdjustOp::Add(add) => {
            for (x, a) in values.iter_mut().zip(add) {
                *x += a;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::classify;

    fn sd1() -> Family {
        Family::named("sd1").unwrap()
    }

    fn xl() -> Family {
        Family::named("sdxl").unwrap()
    }

    fn alpha(text: &str, key: &str) -> Option<f64> {
        let e = parse_elemental(text, sd1(), BlockNames::Standard).unwrap();
        match elemental_alpha(&e, sd1(), BlockNames::Standard, &classify(sd1(), key), key) {
            Some(EntryRatio::Value(v)) => Some(v),
            Some(EntryRatio::Dice(_)) => panic!("a dice ratio"),
            None => None,
        }
    }

    const OUT06_K: &str =
        "model.diffusion_model.output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight";
    const OUT06_Q: &str =
        "model.diffusion_model.output_blocks.6.1.transformer_blocks.0.attn1.to_q.weight";
    const OUT04_A: &str =
        "model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight";
    const OUT05_FF: &str =
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.ff.net.2.weight";

    #[test]
    fn spec_examples() {
        // Later entries win: attn2.to_k gets 0.2, other attn 0.5.
        let t = "OUT06:attn:0.5,OUT06:attn2.to_k:0.2";
        assert_eq!(alpha(t, OUT06_K), Some(0.2));
        assert_eq!(alpha(t, OUT06_Q), Some(0.5));
        assert_eq!(alpha(t, OUT04_A), None);
        // NOT on blocks.
        assert_eq!(alpha("NOT OUT04:attn:1", OUT04_A), None);
        assert_eq!(alpha("NOT OUT04:attn:1", OUT06_Q), Some(1.0));
        // NOT on elements, and newline separators.
        assert_eq!(alpha("OUT05:NOT attn proj:0.2", OUT05_FF), Some(0.2));
        assert_eq!(alpha("\nOUT05:NOT ff:0.2\n", OUT05_FF), None);
        // Ranges in either direction, empty elements = whole blocks.
        assert_eq!(alpha("OUT06-OUT04::0", OUT05_FF), Some(0.0));
        assert_eq!(alpha("IN00-IN05::0", OUT05_FF), None);
        // Pieces without exactly two colons are ignored; bad names are errors.
        assert_eq!(alpha("OUT05:0.3", OUT05_FF), None);
        let e = parse_elemental("OUT99::0.1", sd1(), BlockNames::Standard)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown block `OUT99`"), "{e}");
        assert!(parse_elemental("OUT05::Q", sd1(), BlockNames::Standard).is_err());
        assert_eq!(
            parse_elemental("OUT05::R", sd1(), BlockNames::Standard).unwrap()[0].ratio,
            EntryRatio::Dice('R')
        );
    }

    #[test]
    fn sdxl_real_and_extended_names() {
        let key = "model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight";
        let c = classify(xl(), key);
        let e = parse_elemental("M00:attn1:0.7", xl(), BlockNames::Standard).unwrap();
        assert_eq!(
            elemental_alpha(&e, xl(), BlockNames::Standard, &c, key),
            Some(EntryRatio::Value(0.7))
        );
        // The compatibility quirk: XL M00 answers to "IN09".
        let e = parse_elemental("IN09:attn1:0.6", xl(), BlockNames::ShiftedXl).unwrap();
        assert_eq!(
            elemental_alpha(&e, xl(), BlockNames::ShiftedXl, &c, key),
            Some(EntryRatio::Value(0.6))
        );
        let out3 = "model.diffusion_model.output_blocks.3.0.in_layers.2.weight";
        let e = parse_elemental("OUT00::0.2", xl(), BlockNames::ShiftedXl).unwrap();
        assert_eq!(
            elemental_alpha(&e, xl(), BlockNames::ShiftedXl, &classify(xl(), out3), out3),
            Some(EntryRatio::Value(0.2))
        );
        let e = parse_elemental("MID103::0.4", xl(), BlockNames::Extended).unwrap();
        assert_eq!(
            elemental_alpha(&e, xl(), BlockNames::Extended, &c, key),
            Some(EntryRatio::Value(0.4))
        );
    }

    #[test]
    fn include_exclude() {
        let f = KeyFilter::parse(FilterMode::Exclude, "IN01-IN02 VAE", "attn2", sd1()).unwrap();
        let allows = |k: &str| f.allows(&classify(sd1(), k), k);
        assert!(!allows(
            "model.diffusion_model.input_blocks.2.0.in_layers.0.weight"
        ));
        assert!(!allows("first_stage_model.decoder.conv_in.weight"));
        assert!(!allows(OUT06_K));
        assert!(allows(OUT06_Q));
        let f = KeyFilter::parse(FilterMode::Include, "Adjust", "", sd1()).unwrap();
        assert!(f.allows(&classify(sd1(), ADJUST_KEYS[5]), ADJUST_KEYS[5]));
        assert!(!f.allows(&classify(sd1(), OUT06_Q), OUT06_Q));
        // NOT: every block, VAE and Adjust but the listed (SuperMerger's XY plot). The SD1
        // VAE lives in BASE, so it stays matched through BASE, as in SuperMerger.
        let f = KeyFilter::parse(FilterMode::Include, "NOT OUT06 VAE", "", sd1()).unwrap();
        assert_eq!(f.blocks.len(), 26 + 2 - 2);
        assert!(!f.allows(&classify(sd1(), OUT06_Q), OUT06_Q));
        assert!(f.allows(&classify(sd1(), OUT04_A), OUT04_A));
        assert!(f.allows(&classify(sd1(), ADJUST_KEYS[5]), ADJUST_KEYS[5]));
        // Listed blocks before NOT are added to the complement.
        let f = KeyFilter::parse(FilterMode::Include, "OUT06 NOT OUT06 OUT04", "", sd1()).unwrap();
        assert!(f.allows(&classify(sd1(), OUT06_Q), OUT06_Q));
        assert!(!f.allows(&classify(sd1(), OUT04_A), OUT04_A));
    }

    #[test]
    fn adjust_known_answers() {
        use crate::merge::numerics::Numerics::{Supermerger, F32};
        let v = [1.0, 2.0, 3.0, 4.0, 3.0, 1.0, 2.0, 0.5];
        assert_eq!(
            adjust_op(&v, sd1(), ADJUST_KEYS[0], F32),
            Some(AdjustOp::Scale(0.99))
        );
        assert_eq!(
            adjust_op(&v, sd1(), ADJUST_KEYS[1], F32),
            Some(AdjustOp::Scale(1.02))
        );
        assert_eq!(
            adjust_op(&v, sd1(), ADJUST_KEYS[4], F32),
            Some(AdjustOp::Scale(0.97))
        );
        // SD: c1 = -3 + 1 + 0.5 = -1.5; c2 = 1 + 1 - 2 = 0; c3 = 2 - 2 + 0.5 = 0.5.
        let Some(AdjustOp::Add(a)) = adjust_op(&v, sd1(), ADJUST_KEYS[5], F32) else {
            panic!()
        };
        let want = [0.08f32, -0.03, 0.0, 0.01];
        assert!(
            a.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-7),
            "{a:?}"
        );
        // SDXL: c1 = 1 - 2 - 0.5 = -1.5; c2 = -2 + 0.5 = -1.5; c3 = 3.
        let Some(AdjustOp::Add(a)) = adjust_op(&v, xl(), ADJUST_KEYS[5], F32) else {
            panic!()
        };
        let want = [0.08f32, -0.03, -0.03, 0.06];
        assert!(
            a.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-7),
            "{a:?}"
        );
        // SuperMerger's summation order gives the same values here (to f32).
        for (fam, k) in [(sd1(), 5), (xl(), 5), (sd1(), 0)] {
            assert_eq!(
                adjust_op(&v, fam, ADJUST_KEYS[k], Supermerger),
                adjust_op(&v, fam, ADJUST_KEYS[k], F32)
            );
        }
        assert_eq!(parse_adjust("0,0,0,0,0,0,0,0").unwrap(), None);
        assert!(parse_adjust("1,2").is_err());
    }
}
