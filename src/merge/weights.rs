//! Merge ratios: scalars, per-block (MBW) vectors and named presets (supermerger.md §3.2-3.6).
//!
//! A ratio is written as a number (`0.3`), a comma-separated vector (`0,1,1,...`) or a
//! preset name (`GRAD_V`). Vectors are resolved against the block lists of the model family
//! (`data/families/`): 26 values (BASE, IN00-IN11, M00, OUT00-OUT11) for SD1/SD2, 20 for SDXL
//! (BASE, IN00-IN08, M00, OUT00-OUT08), 61 (SuperMerger) or 63 (ComfyUI) for Flux. For SDXL a
//! 26-value vector is converted by dropping IN09-IN11 and OUT09-OUT11, and a 110-value vector
//! addresses the fine "extended XL" blocks.

use std::collections::BTreeMap;
use std::path::Path;

use crate::arch::family::Unlisted;
use crate::arch::{Family, KeyClass};
use crate::error::{Error, Result};

const BUILTIN_PRESETS: &str = include_str!("../../data/presets/mbw-presets.tsv");

/// Named MBW presets: SuperMerger's shipped list plus any user preset files.
#[derive(Debug, Clone)]
pub struct Presets {
    map: BTreeMap<String, Vec<f64>>,
}

impl Default for Presets {
    fn default() -> Self {
        let mut p = Presets {
            map: BTreeMap::new(),
        };
        p.add_text(BUILTIN_PRESETS, "built-in presets")
            .expect("built-in presets parse");
        p
    }
}

impl Presets {
    /// Adds presets from text: one per line, `NAME<TAB>v1,v2,...` or `NAME:v1,v2,...`;
    /// blank lines, `#` comments and a `preset_name` header line are skipped.
    pub fn add_text(&mut self, text: &str, origin: &str) -> Result<()> {
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("preset_name") {
                continue;
            }
            let (name, values) = line
                .split_once('\t')
                .or_else(|| line.split_once(':'))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{origin}:{}: expected `NAME<TAB>v1,v2,...` or `NAME:v1,v2,...`",
                        n + 1
                    ))
                })?;
            let values = parse_list(values).map_err(|e| {
                Error::Invalid(format!("{origin}:{}: preset `{}`: {e}", n + 1, name.trim()))
            })?;
            self.map.insert(name.trim().to_string(), values);
        }
        Ok(())
    }

    /// Adds presets from a file (see [`Presets::add_text`]).
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        self.add_text(&text, &path.display().to_string())
    }

    /// The values of a preset.
    pub fn get(&self, name: &str) -> Option<&[f64]> {
        self.map.get(name).map(|v| &v[..])
    }

    /// All preset names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|k| k.as_str())
    }
}

fn parse_list(text: &str) -> std::result::Result<Vec<f64>, String> {
    text.split(',')
        .map(|v| {
            let v = v.trim();
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("`{v}` is not a number"))
        })
        .collect()
}

/// A ratio as the user wrote it, after preset lookup.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Ratio {
    /// The same value for every block.
    Scalar(f64),
    /// One value per block (length checked against the family later).
    Blocks(Vec<f64>),
}

impl Ratio {
    /// Parses `0.3`, `v1,v2,...` or a preset name.
    ///
    /// ```
    /// use mergesmith::merge::{Presets, Ratio};
    ///
    /// let presets = Presets::default();
    /// assert_eq!(Ratio::parse("0.3", &presets).unwrap(), Ratio::Scalar(0.3));
    /// let Ratio::Blocks(v) = Ratio::parse("GRAD_V", &presets).unwrap() else { panic!() };
    /// assert_eq!((v.len(), v[1], v[13]), (26, 1.0, 0.0)); // IN00 = 1, M00 = 0
    /// assert!(Ratio::parse("GRAD_X", &presets).is_err());
    /// ```
    pub fn parse(text: &str, presets: &Presets) -> Result<Ratio> {
        let t = text.trim();
        if let Ok(v) = t.parse::<f64>() {
            if !v.is_finite() {
                return Err(Error::Invalid(format!(
                    "ratio `{t}` is not a finite number"
                )));
            }
            return Ok(Ratio::Scalar(v));
        }
        if t.contains(',') {
            return parse_list(t)
                .map(Ratio::Blocks)
                .map_err(|e| Error::Invalid(format!("ratio vector: {e}")));
        }
        match presets.get(t) {
            Some(v) => Ok(Ratio::Blocks(v.to_vec())),
            None => {
                let near = crate::text::nearest(t, presets.names());
                Err(Error::Invalid(format!(
                    "`{t}` is neither a number, a comma-separated vector nor a known preset{}",
                    near.map(|n| format!(" (did you mean `{n}`?)"))
                        .unwrap_or_default()
                )))
            }
        }
    }

    /// The BASE value (the whole value for a scalar).
    pub fn base(&self) -> f64 {
        match self {
            Ratio::Scalar(v) => *v,
            Ratio::Blocks(v) => v.first().copied().unwrap_or(0.0),
        }
    }
}

/// A ratio resolved for one model family: the value each key gets.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockRatio {
    /// Same value everywhere.
    Scalar(f64),
    /// Indexed by the family's default block list.
    Blocks(Vec<f64>),
    /// Indexed by the family's second block list (SDXL's 110 fine names, Flux's ComfyUI list).
    Extended(Vec<f64>),
}

impl BlockRatio {
    /// Resolves `ratio` for `family`, checking the vector length: the default block list's
    /// length, a length the family converts (SDXL: 26), or the second list's length (SDXL's
    /// 110 fine names, Flux's 63 ComfyUI prefixes).
    pub fn resolve(ratio: &Ratio, family: Family, what: &str) -> Result<BlockRatio> {
        Self::resolve_in(ratio, family, what, None)
    }

    /// Like [`BlockRatio::resolve`], with the block list named (`supermerger`, `comfyui`,
    /// ...): the vector must have that list's length (or, for the first list, a length it
    /// converts).
    pub fn resolve_in(
        ratio: &Ratio,
        family: Family,
        what: &str,
        list: Option<&str>,
    ) -> Result<BlockRatio> {
        let lists = family.lists();
        if let Some(name) = list {
            let ids: Vec<&str> = lists.iter().take(2).map(|l| l.id()).collect();
            let i = ids.iter().position(|id| *id == name).ok_or_else(|| {
                let near = crate::text::nearest(name, ids.iter().copied());
                Error::Invalid(format!(
                    "{what}: {} has no block list `{name}`{}; its lists are {}",
                    family.label(),
                    near.map(|n| format!(" (did you mean `{n}`?)"))
                        .unwrap_or_default(),
                    ids.join(", ")
                ))
            })?;
            let Ratio::Blocks(v) = ratio else {
                return Ok(BlockRatio::Scalar(ratio.base()));
            };
            let l = &lists[i];
            let converts = i == 0 && l.convert.as_ref().is_some_and(|(from, _)| *from == v.len());
            if v.len() != l.slots.len() && !converts {
                return Err(Error::Invalid(format!(
                    "{what}: block list `{name}` of {} has {} slots ({} ... {}), got {} values",
                    family.label(),
                    l.slots.len(),
                    l.slots[0],
                    l.slots[l.slots.len() - 1],
                    v.len()
                )));
            }
        }
        let v = match ratio {
            Ratio::Scalar(s) => return Ok(BlockRatio::Scalar(*s)),
            Ratio::Blocks(v) => v,
        };
        let first = &lists[0];
        let second = lists.get(1).map(|l| l.id());
        if v.len() == first.slots.len()
            && first.slots.len() > 1
            && (list.is_none() || list != second)
        {
            return Ok(BlockRatio::Blocks(v.clone()));
        }
        if let Some((from, take)) = &first.convert {
            if v.len() == *from {
                return Ok(BlockRatio::Blocks(take.iter().map(|&i| v[i]).collect()));
            }
        }
        if lists.get(1).is_some_and(|l| l.slots.len() == v.len()) && list != Some(first.id()) {
            return Ok(BlockRatio::Extended(v.clone()));
        }
        if first.slots.len() == 1 {
            return Err(Error::Invalid(format!(
                "{what}: per-block weights need a recognized architecture ({} has no block list); use a single number",
                family.label()
            )));
        }
        let mut takes = vec![format!(
            "{} block weights ({} ... {})",
            first.slots.len(),
            first.slots[0],
            first.slots[first.slots.len() - 1]
        )];
        if let Some((from, _)) = &first.convert {
            takes.push(format!("{from} (converted)"));
        }
        takes.extend(
            lists[1..]
                .iter()
                .map(|l| format!("{} ({})", l.slots.len(), l.id())),
        );
        let last = takes.pop().unwrap_or_default();
        let takes = match takes.is_empty() {
            true => last,
            false => format!("{} or {last}", takes.join(", ")),
        };
        Err(Error::Invalid(format!(
            "{what}: {} takes {takes}, got {}",
            family.label(),
            v.len()
        )))
    }

    /// The value for a key of the given class; `None` when a vector's list has no block for
    /// the key and the list says such keys keep model A.
    pub fn value(&self, family: Family, class: &KeyClass) -> Option<f64> {
        let (v, list, block) = match self {
            BlockRatio::Scalar(s) => return Some(*s),
            BlockRatio::Blocks(v) => (v, &family.lists()[0], class.block.as_deref()),
            BlockRatio::Extended(v) => (v, &family.lists()[1], class.fine.as_deref()),
        };
        match block {
            Some(b) if list.def.first_for.iter().any(|f| f == b) => Some(v[0]),
            Some(b) => Some(
                list.slots
                    .iter()
                    .position(|n| n == b)
                    .map_or(v[0], |i| v[i]),
            ),
            None if list.def.unlisted == Unlisted::Keep => None,
            None => Some(v[0]),
        }
    }

    /// The per-block values without BASE, as SuperMerger logs them (`None` for a scalar).
    pub fn without_base(&self) -> Option<Vec<f64>> {
        match self {
            BlockRatio::Scalar(_) => None,
            BlockRatio::Blocks(v) | BlockRatio::Extended(v) => Some(v[1..].to_vec()),
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

    #[test]
    fn parse_forms() {
        let p = Presets::default();
        assert_eq!(Ratio::parse("0.25", &p).unwrap(), Ratio::Scalar(0.25));
        assert_eq!(
            Ratio::parse("1,2", &p).unwrap(),
            Ratio::Blocks(vec![1.0, 2.0])
        );
        assert_eq!(
            Ratio::parse("ALL_B", &p).unwrap(),
            Ratio::Blocks(vec![1.0; 26])
        );
        let e = Ratio::parse("GRAD-V", &p).unwrap_err().to_string();
        assert!(e.contains("did you mean `GRAD_V`"), "{e}");
        assert!(Ratio::parse("1,x", &p).is_err());
        assert!(Ratio::parse("nan", &p).is_err());
    }

    #[test]
    fn formula_presets_match_the_table() {
        // supermerger.md §3.6: j = 0..24 over IN00..OUT11, BASE = 0.
        let p = Presets::default();
        let s = |t: f64| 3.0 * t * t - 2.0 * t * t * t;
        let fold = |x: f64| {
            if x % 2.0 <= 1.0 {
                x % 2.0
            } else {
                2.0 - x % 2.0
            }
        };
        type F = Box<dyn Fn(f64) -> f64>;
        let cases: Vec<(&str, F, f64)> = vec![
            ("SMOOTHSTEP", Box::new(move |j| s(j / 24.0)), 1e-12),
            (
                "REVERSE-SMOOTHSTEP",
                Box::new(move |j| 1.0 - s(j / 24.0)),
                1e-12,
            ),
            (
                "COSINE",
                Box::new(|j| (1.0 + (std::f64::consts::PI * j / 24.0).cos()) / 2.0),
                1e-12,
            ),
            (
                "SMOOTHSTEP*3",
                Box::new(move |j| fold(3.0 * s(j / 24.0))),
                1e-12,
            ),
            (
                "R_SMOOTHSTEP/4",
                Box::new(move |j| 1.0 - s(fold(4.0 * j / 24.0))),
                1e-12,
            ),
            (
                "GRAD_V",
                Box::new(|j| {
                    if j < 12.0 {
                        1.0 - j / 12.0
                    } else if j == 12.0 {
                        0.0
                    } else {
                        (j - 12.0) / 12.0
                    }
                }),
                1e-10,
            ),
        ];
        for (name, f, tol) in cases {
            let v = p.get(name).unwrap();
            assert_eq!(v.len(), 26);
            assert_eq!(v[0], 0.0, "{name} BASE");
            for j in 0..25 {
                assert!(
                    (v[j + 1] - f(j as f64)).abs() < tol,
                    "{name}[{j}] = {} vs {}",
                    v[j + 1],
                    f(j as f64)
                );
            }
        }
    }

    #[test]
    fn sdxl_conversion_of_26_vectors() {
        let v: Vec<f64> = (0..26).map(|i| i as f64).collect();
        let r = BlockRatio::resolve(&Ratio::Blocks(v), xl(), "alpha").unwrap();
        let expect: Vec<f64> = [
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
        ]
        .iter()
        .map(|&i| i as f64)
        .collect();
        assert_eq!(r, BlockRatio::Blocks(expect));
        assert!(BlockRatio::resolve(&Ratio::Blocks(vec![0.0; 21]), xl(), "alpha").is_err());
        assert!(BlockRatio::resolve(&Ratio::Blocks(vec![0.0; 20]), sd1(), "alpha").is_err());
    }

    #[test]
    fn values_per_key() {
        let v: Vec<f64> = (0..26).map(|i| i as f64 / 100.0).collect();
        let r = BlockRatio::resolve(&Ratio::Blocks(v), sd1(), "alpha").unwrap();
        let at = |k: &str| r.value(sd1(), &classify(sd1(), k)).unwrap();
        assert_eq!(
            at("model.diffusion_model.input_blocks.4.1.proj_in.weight"),
            0.05
        );
        assert_eq!(at("model.diffusion_model.middle_block.1.norm.bias"), 0.13);
        assert_eq!(at("model.diffusion_model.out.2.weight"), 0.25);
        assert_eq!(at("first_stage_model.encoder.conv_in.weight"), 0.0);

        let ext: Vec<f64> = (0..110).map(|i| i as f64).collect();
        let r = BlockRatio::resolve(&Ratio::Blocks(ext), xl(), "alpha").unwrap();
        let at = |k: &str| r.value(xl(), &classify(xl(), k)).unwrap();
        assert_eq!(at("conditioner.embedders.1.model.ln_final.weight"), 1.0); // CLIPG
        assert_eq!(at("first_stage_model.encoder.conv_in.weight"), 0.0); // VAE uses base
        let in410 = xl().lists()[1]
            .slots
            .iter()
            .position(|n| n == "IN410")
            .unwrap() as f64;
        assert_eq!(
            at("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
            in410
        );
    }
}
