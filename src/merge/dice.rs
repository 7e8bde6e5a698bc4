//! SuperMerger's random merges ("Let the dice roll"): block-vector tokens `R`, `U`, `X`, `D`
//! and `ER` / `EU` / `EX`, and `R` / `U` / `X` elemental ratios, drawn as SuperMerger draws
//! them so that a seed gives SuperMerger's weights.
//!
//! SuperMerger seeds numpy's legacy `RandomState` (`np.random.seed(seed)`: MT19937's
//! `init_genrand`) and takes `np.random.rand(3000)`: the value of block `i` of alpha is
//! `r[i]`, of beta `r[i + 50]`, an elemental ratio of the key at position `n` of model A's
//! (sorted) keys `r[n + 100]`. Then, per token, with the panel's limits `upper`, `lower`
//! (per block) and clamps `max`, `min`:
//!
//! | token | value |
//! |---|---|
//! | `R` | `r`, clamped |
//! | `U` | `1.5 - 2r`, clamped |
//! | `X` | `lower + (1 - r)·(upper - lower)` (written `(lower - upper)·r + upper`), clamped |
//! | `D` | `upper + lower·(r - 0.5)` (`upper` the middle, `lower` the width), clamped |
//! | `ER` / `EU` / `EX` | 0 for the block, and an elemental entry `BLOCK::R` (`U`, `X`) |
//!
//! rounded as numpy rounds (`rint(x·10ⁿ)/10ⁿ`, `round` decimals). Elemental ratios are not
//! clamped; an elemental `U` is `1 - 2r` (SuperMerger's own constant there). Limits written
//! `0.5R0.3` ("zero the block with probability 0.7") draw SuperMerger's coin from Python's
//! unseeded `random`; here the coin comes from the same seed, so it repeats but cannot match.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::noise::Mt19937;

/// numpy's legacy `RandomState`: MT19937 seeded by `init_genrand` (`np.random.seed(seed)`),
/// enough for `rand()`.
pub struct LegacyRandom(Mt19937);

impl LegacyRandom {
    /// `np.random.seed(seed)`.
    pub fn new(seed: u32) -> Self {
        LegacyRandom(Mt19937::new(seed))
    }

    /// `np.random.random_sample()`: 53 random bits in [0, 1).
    pub fn random_sample(&mut self) -> f64 {
        let a = (self.0.next_u32() >> 5) as f64;
        let b = (self.0.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }
}

/// The dice panel's settings (SuperMerger's "Let the dice roll").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dice {
    /// Seed of numpy's `RandomState` (0 to 4294967295; SuperMerger's "Seed for Random Ratio").
    pub seed: u32,
    /// Decimals kept (SuperMerger's "Round", default 3).
    #[serde(default = "default_round")]
    pub round: u32,
    /// `X`'s upper limit and `D`'s middle: one value, or one per block (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<String>,
    /// `X`'s lower limit and `D`'s width: one value, or one per block (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<String>,
    /// Clamp of every drawn block value from above: one value or one per block (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
    /// Clamp from below (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<String>,
}

fn default_round() -> u32 {
    3
}

impl Dice {
    /// A seed with SuperMerger's default panel: 3 decimals, limits 0 to 1.
    pub fn new(seed: u32) -> Dice {
        Dice {
            seed,
            round: default_round(),
            upper: None,
            lower: None,
            max: None,
            min: None,
        }
    }
}

/// Whether a vector entry or elemental ratio is a dice token.
pub fn is_token(s: &str) -> bool {
    matches!(s.trim(), "R" | "U" | "X" | "D" | "ER" | "EU" | "EX")
}

/// Whether a ratio text (a vector, comma separated) holds any dice token.
pub fn has_tokens(text: &str) -> bool {
    text.split(',').any(is_token)
}

/// A ratio text's entries when it holds dice tokens (a vector with `R`, `U`, `X`, `D`, `ER`,
/// `EU` or `EX` among its values, or the presets `ALL_R`, `ALL_U`, `ALL_X`: 26 of one token).
pub fn tokens(text: &str) -> Option<Vec<String>> {
    let t = text.trim();
    if let Some(tok) = t
        .strip_prefix("ALL_")
        .filter(|k| matches!(*k, "R" | "U" | "X"))
    {
        return Some(vec![tok.to_string(); 26]);
    }
    let parts: Vec<String> = t
        .split([',', '\n'])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    parts.iter().any(|p| is_token(p)).then_some(parts)
}

/// Draws the dice tokens of a merge's ratio texts in SuperMerger's order (alpha, then beta),
/// collecting the elemental entries its `E` tokens add.
pub struct Roller {
    draw: Option<Draw>,
    shifted: bool,
    drawn: Vec<String>,
}

impl Roller {
    /// A roller for a merge with these dice (none: tokens are an error); `shifted`: the merge
    /// reads SDXL elemental names shifted.
    pub fn new(dice: Option<&Dice>, shifted: bool) -> Roller {
        Roller {
            draw: dice.map(Draw::new),
            shifted,
            drawn: Vec::new(),
        }
    }

    /// The drawn vector of a ratio text with dice tokens; `None` for a text without.
    pub fn roll(&mut self, text: &str, beta: bool) -> Result<Option<Vec<f64>>> {
        if tokens(text).is_none() {
            return Ok(None);
        }
        let draw = self.draw.as_mut().ok_or_else(|| needs_seed(text))?;
        Ok(draw
            .resolve(text, beta, self.shifted)?
            .map(|(values, elemental)| {
                self.drawn.extend(elemental);
                values
            }))
    }

    /// The merge's elemental text with the entries its `E` tokens added.
    pub fn elemental(&self, own: Option<String>) -> Option<String> {
        match (own, self.drawn.is_empty()) {
            (e, true) => e,
            (None, false) => Some(self.drawn.join(",")),
            (Some(e), false) => Some(format!("{e},{}", self.drawn.join(","))),
        }
    }
}

/// The error for dice tokens without a seed.
fn needs_seed(text: &str) -> Error {
    Error::Invalid(format!(
        "`{}` holds dice tokens (R, U, X, D, ER, EU, EX): give the merge a dice seed (`dice: {{ seed: N }}`, `--dice-seed N`)",
        text.trim()
    ))
}

/// numpy's `round(x, n)` on a float64: `rint(x·10ⁿ) / 10ⁿ`.
fn np_round(x: f64, n: u32) -> f64 {
    let p = 10f64.powi(n as i32);
    (x * p).round_ties_even() / p
}

/// One limit per block from a setting (one value is repeated).
fn per_block(text: Option<&str>, default: &str, n: usize, what: &str) -> Result<Vec<String>> {
    let parts: Vec<String> = text
        .unwrap_or(default)
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    match parts.len() {
        1 => Ok(vec![parts[0].clone(); n]),
        m if m >= n => Ok(parts),
        m => Err(Error::Invalid(format!(
            "dice `{what}` has {m} values; give one, or one per block ({n})"
        ))),
    }
}

fn num(text: &str, what: &str) -> Result<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| Error::Invalid(format!("dice `{what}`: `{text}` is not a number")))
}

/// The drawn numbers of one seed (SuperMerger's `randomer`).
pub struct Draw {
    r: Vec<f64>,
    dice: Dice,
    coin: LegacyRandom,
}

/// Offsets into the drawn numbers (SuperMerger's `RANDMAP`).
const ALPHA: usize = 0;
const BETA: usize = 50;
const ELEMENTAL: usize = 100;

impl Draw {
    /// `np.random.seed(seed); np.random.rand(3000)`.
    pub fn new(dice: &Dice) -> Draw {
        let mut rng = LegacyRandom::new(dice.seed);
        let r = (0..3000).map(|_| rng.random_sample()).collect();
        Draw {
            r,
            dice: dice.clone(),
            coin: LegacyRandom::new(dice.seed ^ 0x5eed_c0de),
        }
    }

    fn at(&self, i: usize) -> Result<f64> {
        self.r.get(i).copied().ok_or_else(|| {
            Error::Invalid(format!(
                "SuperMerger draws 3000 numbers per seed; position {i} is past them"
            ))
        })
    }

    /// A block vector with dice tokens resolved (`beta`: beta's offset). `names` are the
    /// blocks of the vector's list; `ER`/`EU`/`EX` blocks come back as elemental entries.
    pub fn vector(
        &mut self,
        entries: &[&str],
        beta: bool,
        names: &[String],
    ) -> Result<(Vec<f64>, Vec<String>)> {
        let n = entries.len();
        let up = per_block(self.dice.upper.as_deref(), "1", n, "upper")?;
        let low = per_block(self.dice.lower.as_deref(), "0", n, "lower")?;
        let max = per_block(self.dice.max.as_deref(), "1", n, "max")?;
        let min = per_block(self.dice.min.as_deref(), "0", n, "min")?;
        let add = if beta { BETA } else { ALPHA };
        let round = self.dice.round;
        let mut out = Vec::with_capacity(n);
        let mut elemental: [(char, Vec<&str>); 3] =
            [('R', Vec::new()), ('U', Vec::new()), ('X', Vec::new())];
        for (i, e) in entries.iter().enumerate() {
            let token = e.trim();
            let clamp = |v: f64| -> Result<f64> {
                let (hi, lo) = (num(&max[i], "max")?, num(&min[i], "min")?);
                // A clamp that wins keeps the limit's value (Python's round of it).
                Ok(if v > hi {
                    py_round(hi, round)
                } else if v < lo {
                    py_round(lo, round)
                } else {
                    np_round(v, round)
                })
            };
            let r = if is_token(token) {
                self.at(i + add)?
            } else {
                0.0
            };
            let v = match token {
                "R" => clamp(r)?,
                "U" => clamp(-2.0 * r + 1.5)?,
                "X" => {
                    let (l, u) = self.coin_limits(&low[i], &up[i])?;
                    clamp((l - u) * r + u)?
                }
                "D" => {
                    let (l, u) = self.coin_limits(&low[i], &up[i])?;
                    clamp(u + l * (r - 0.5))?
                }
                "ER" | "EU" | "EX" => {
                    let c = token.chars().nth(1).unwrap_or('R');
                    let name = names.get(i).ok_or_else(|| {
                        Error::Invalid(format!("dice token `{token}` at position {i}: no block"))
                    })?;
                    if let Some(slot) = elemental.iter_mut().find(|(k, _)| *k == c) {
                        slot.1.push(name);
                    }
                    0.0
                }
                other => num(other, "vector")?,
            };
            out.push(v);
        }
        let entries = elemental
            .iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(c, b)| format!("{}::{c}", b.join(" ")))
            .collect();
        Ok((out, entries))
    }

    /// Resolves a ratio text's dice tokens (`beta`: beta's numbers): the vector and the
    /// elemental entries its `E` tokens add; `None` when the text has no token. `shifted`:
    /// the merge reads SDXL elemental names shifted, so `E` entries name the blocks as
    /// SuperMerger does, by the SD list's name at the vector position.
    pub fn resolve(
        &mut self,
        text: &str,
        beta: bool,
        shifted: bool,
    ) -> Result<Option<(Vec<f64>, Vec<String>)>> {
        let Some(entries) = tokens(text) else {
            return Ok(None);
        };
        let names = crate::arch::family::list_of_len(entries.len()).ok_or_else(|| {
            Error::Invalid(format!(
                "a dice vector needs one entry per block of a family's list (26 SD, 20 SDXL, 61 Flux...), not {}",
                entries.len()
            ))
        })?;
        let names = if shifted && entries.len() < 26 {
            crate::merge::select::sd_list()
        } else {
            names
        };
        let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
        self.vector(&refs, beta, names).map(Some)
    }

    /// `X`/`D` limits of one block; `lowRp` (e.g. `0.5R0.3`) keeps the block with
    /// probability `p` and zeroes both limits otherwise.
    fn coin_limits(&mut self, low: &str, up: &str) -> Result<(f64, f64)> {
        match low.split_once('R') {
            Some((l, p)) => {
                if self.coin.random_sample() > num(p, "lower")? {
                    Ok((0.0, 0.0))
                } else {
                    Ok((num(l, "lower")?, num(up, "upper")?))
                }
            }
            None => Ok((num(low, "lower")?, num(up, "upper")?)),
        }
    }

    /// An elemental ratio token for the key at position `key_index` of model A's sorted keys,
    /// in the block at `block` of the family's default list.
    pub fn elemental(&self, token: char, key_index: usize, block: usize) -> Result<f64> {
        let r = self.at(key_index + ELEMENTAL)?;
        let round = self.dice.round;
        Ok(match token {
            'R' => np_round(r, round),
            'U' => np_round(-2.0 * r + 1.0, round),
            _ => {
                let up = per_block(self.dice.upper.as_deref(), "1", block + 1, "upper")?;
                let low = per_block(self.dice.lower.as_deref(), "0", block + 1, "lower")?;
                let (l, u) = (num(&low[block], "lower")?, num(&up[block], "upper")?);
                np_round((l - u) * r + u, round)
            }
        })
    }
}

/// Python's `round(x, n)` (correctly rounded, ties to even on the exact value).
fn py_round(x: f64, n: u32) -> f64 {
    format!("{x:.*}", n as usize).parse().unwrap_or(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(m: u64, e: i32) -> f64 {
        m as f64 / (1u64 << 52) as f64 * 2f64.powi(e)
    }

    #[test]
    fn matches_numpy_random_state() {
        // numpy 2.4: np.random.seed(s); r = np.random.rand(3000); float(r[i]).hex() at
        // i = 0, 1, 2, 50, 100, 2999.
        let cases: [(u32, [(u64, i32); 6]); 3] = [
            (
                0,
                [
                    (0x118fe1565f12a8, -1),
                    (0x16e2d4cf608733, -1),
                    (0x1349d66b6e894b, -1),
                    (0x123f0d4c2758fe, -1),
                    (0x15b0ac4e474a0c, -1),
                    (0x16511a99299154, -1),
                ],
            ),
            (
                42,
                [
                    (0x17f8771e5f51ec, -2),
                    (0x1e6c4068bbd654, -1),
                    (0x176c7e8f1e6751, -1),
                    (0x1f06d6575e7fe6, -1),
                    (0x10177c795430d0, -5),
                    (0x1be29faf440130, -1),
                ],
            ),
            (
                4_294_967_293,
                [
                    (0x10f3fee64e07be, -1),
                    (0x1580806c2b6c3f, -1),
                    (0x1c3235278a03e8, -1),
                    (0x1681348f810000, -16),
                    (0x17bfb9e3119781, -1),
                    (0x1f16a3614c7be0, -5),
                ],
            ),
        ];
        for (seed, want) in cases {
            let d = Draw::new(&Dice::new(seed));
            for (&i, (m, e)) in [0usize, 1, 2, 50, 100, 2999].iter().zip(want) {
                assert_eq!(d.r[i], hex(m, e), "seed {seed}, r[{i}]");
            }
        }
    }

    #[test]
    fn tokens_as_supermerger_draws_them() {
        // seed 42: r[0..5] = 0.3745..., 0.9507..., 0.7319..., 0.5986..., 0.1560...
        // (numpy: [round(r[i], 3) ...] = 0.375, 0.951, 0.732, 0.599, 0.156); U at 1 is
        // 1.5 - 2·0.9507 = -0.401, clamped to 0 by the default min; X at 2 (upper 1, lower 0)
        // is 1 - r = 0.268; D at 3 (middle 1, width 0) is 1.
        let dice = Dice::new(42);
        let names: Vec<String> = (0..5).map(|i| format!("B{i}")).collect();
        let (v, e) = Draw::new(&dice)
            .vector(&["R", "U", "X", "D", "0.5"], false, &names)
            .unwrap();
        assert_eq!(v, vec![0.375, 0.0, 0.268, 1.0, 0.5]);
        assert!(e.is_empty());
        // Without the clamps U keeps its value; ER blocks become an elemental entry.
        let wide = Dice {
            min: Some("-1".into()),
            max: Some("2".into()),
            ..dice.clone()
        };
        let (v, e) = Draw::new(&wide)
            .vector(&["ER", "U", "ER", "EX"], false, &names)
            .unwrap();
        assert_eq!(v, vec![0.0, -0.401, 0.0, 0.0]);
        assert_eq!(e, vec!["B0 B2::R".to_string(), "B3::X".to_string()]);
        // beta reads 50 further on: r[50] = 0.9696 -> 0.97.
        let (v, _) = Draw::new(&dice).vector(&["R"], true, &names).unwrap();
        assert_eq!(v, vec![0.97]);
    }

    #[test]
    fn numpy_rounding_is_not_pythons() {
        // 1.0005 * 1000 = 1000.4999999999999 -> rint 1000 -> 1.0 (Python also gives 1.0);
        // 0.285 * 100 = 28.499999999999996 -> 0.28, as numpy; 2.5 ties to even.
        assert_eq!(np_round(1.0005, 3), 1.0);
        assert_eq!(np_round(0.285, 2), 0.28);
        assert_eq!(np_round(2.5, 0), 2.0);
        assert_eq!(py_round(0.125, 2), 0.12);
    }
}
