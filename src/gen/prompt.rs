//! Prompt syntax as the web UIs read it: emphasis weights, `BREAK`, and the split into
//! 75-token chunks.
//!
//! A1111 (`emphasis: a1111`, the default; its `prompt_parser.parse_prompt_attention` and
//! `sd_hijack_clip`):
//! - `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)`
//!   multiplies it by 1.3; brackets nest (weights multiply); an unclosed `(` or `[` applies to
//!   the end of the prompt; `\(`, `\)`, `\[`, `\]` and `\\` are literal characters.
//! - Each run of text is tokenized on its own; `BREAK` (a word, in capitals) ends the chunk.
//! - Chunks hold 75 tokens; when a chunk fills up and its last comma is at most 20 tokens
//!   back, the tokens after the comma move to the next chunk (A1111's "comma padding
//!   backtrack", default 20).
//! - After the text encoder, each token's hidden state is multiplied by its weight and the
//!   chunk is rescaled to its mean before weighting (A1111's "Original" emphasis).
//!
//! `emphasis: no_norm` weights without restoring the mean (A1111's "No norm"); `emphasis:
//! none` reads the syntax but weights nothing (A1111's "None"). `emphasis: comfyui` takes
//! ComfyUI's reading: only round brackets weigh (`[text]` is literal text), and a token of
//! weight `w` becomes `empty + (z − empty)·w`, where `empty` is the encoding of the empty
//! prompt at the same position; chunks are still split the A1111 way (ComfyUI moves whole
//! words instead of backtracking to a comma), which differs only in prompts over 75 tokens.
//!
//! A1111's prompt editing (`[from:to:when]`, `[a|b]`), `AND` and extra networks
//! (`<lora:...>`, `<hypernet:...>`) are refused with a message, not read as literal text.

use crate::error::{Error, Result};

/// How prompt weights are read and applied.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Emphasis {
    /// A1111's "Original": weights, then the chunk's mean restored.
    #[default]
    A1111,
    /// A1111's "No norm": weights without restoring the mean.
    NoNorm,
    /// A1111's "None": the syntax is read, no weight is applied.
    None,
    /// ComfyUI's: `( )` weights only, interpolated from the empty prompt's encoding.
    Comfyui,
}

impl crate::text::Named for Emphasis {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("a1111", Emphasis::A1111),
        ("no_norm", Emphasis::NoNorm),
        ("none", Emphasis::None),
        ("comfyui", Emphasis::Comfyui),
        ("Original", Emphasis::A1111),
        ("No norm", Emphasis::NoNorm),
        ("None", Emphasis::None),
    ];
}

impl Emphasis {
    /// A1111's "Emphasis" label in `parameters`, written when not its default.
    pub fn a1111_label(self) -> Option<&'static str> {
        match self {
            Emphasis::A1111 => None,
            Emphasis::NoNorm => Some("No norm"),
            Emphasis::None => Some("None"),
            Emphasis::Comfyui => Some("ComfyUI"),
        }
    }
}

/// One piece of a parsed prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text and its weight.
    Text(String, f64),
    /// `BREAK`: start a new chunk.
    Break,
}

/// Parses `text` into runs of equal weight, as A1111's `parse_prompt_attention` does (with
/// ComfyUI's square brackets as literal text under [`Emphasis::Comfyui`]).
pub fn parse(text: &str, emphasis: Emphasis) -> Result<Vec<Piece>> {
    refuse_unsupported(text)?;
    let squares = emphasis != Emphasis::Comfyui;
    // (text, weight); weight -1 marks BREAK, as A1111 does.
    let mut res: Vec<(String, f64)> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<(String, f64)>, from: usize, m: f64| {
        for r in &mut res[from..] {
            r.1 *= m;
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        // `\(` `\)` `\[` `\]` `\\`: the character; a lone `\` stays.
        if c == '\\' {
            match chars.get(i + 1) {
                Some(&n) if "()[]\\".contains(n) => {
                    res.push((n.to_string(), 1.0));
                    i += 2;
                }
                _ => {
                    res.push(("\\".into(), 1.0));
                    i += 1;
                }
            }
            continue;
        }
        if c == '(' {
            round.push(res.len());
            i += 1;
            continue;
        }
        if c == '[' && squares {
            square.push(res.len());
            i += 1;
            continue;
        }
        if c == ':' {
            // `:\s*number\s*)` closes a round bracket with that weight.
            if let Some((weight, end)) = weight_close(&chars, i) {
                if let Some(from) = round.pop() {
                    let w: f64 = weight.parse().map_err(|_| {
                        Error::Invalid(format!(
                            "prompt: `{weight}` in `:{weight})` is not a number"
                        ))
                    })?;
                    multiply(&mut res, from, w);
                    i = end;
                    continue;
                }
                // Without an open bracket the match is plain text (A1111 falls through).
                push_text(&mut res, &chars[i..end].iter().collect::<String>());
                i = end;
                continue;
            }
            push_text(&mut res, ":");
            i += 1;
            continue;
        }
        if c == ')' && !round.is_empty() {
            let from = round.pop().unwrap_or_default();
            multiply(&mut res, from, 1.1);
            i += 1;
            continue;
        }
        if c == ']' && squares && !square.is_empty() {
            let from = square.pop().unwrap_or_default();
            multiply(&mut res, from, 1.0 / 1.1);
            i += 1;
            continue;
        }
        if c == ')' || (c == ']' && squares) {
            // An unmatched closing bracket is text of its own.
            push_text(&mut res, &c.to_string());
            i += 1;
            continue;
        }
        // A run of plain text.
        let start = i;
        while i < chars.len() {
            let c = chars[i];
            if "\\():".contains(c) || (squares && (c == '[' || c == ']')) {
                break;
            }
            i += 1;
        }
        push_text(&mut res, &chars[start..i].iter().collect::<String>());
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    // Runs of identical weight merge.
    let mut merged: Vec<(String, f64)> = Vec::new();
    for (t, w) in res {
        match merged.last_mut() {
            Some(last) if last.1 == w => last.0.push_str(&t),
            _ => merged.push((t, w)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(t, w)| match w == -1.0 && t == "BREAK" {
            true => Piece::Break,
            false => Piece::Text(t, w),
        })
        .collect())
}

/// Appends plain text, splitting it at `BREAK` words (with the whitespace around them).
fn push_text(res: &mut Vec<(String, f64)>, text: &str) {
    let mut rest = text;
    let mut first = true;
    loop {
        let found = find_break(rest);
        if !first {
            res.push(("BREAK".into(), -1.0));
        }
        first = false;
        match found {
            None => {
                res.push((rest.to_string(), 1.0));
                return;
            }
            Some((a, b)) => {
                res.push((rest[..a].to_string(), 1.0));
                rest = &rest[b..];
            }
        }
    }
}

/// The byte span of the first `\s*\bBREAK\b\s*` in `text`.
fn find_break(text: &str) -> Option<(usize, usize)> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(pos) = text[from..].find("BREAK") {
        let at = from + pos;
        let before = text[..at].chars().next_back();
        let after = text[at + 5..].chars().next();
        if !before.is_some_and(word) && !after.is_some_and(word) {
            let start = text[..at].trim_end().len();
            let end = at + 5 + (text[at + 5..].len() - text[at + 5..].trim_start().len());
            return Some((start, end));
        }
        from = at + 5;
    }
    None
}

/// At a `:` at `i`: the number of `:\s*([+-]?[.\d]+)\s*\)` and the index after the `)`.
fn weight_close(chars: &[char], i: usize) -> Option<(String, usize)> {
    let mut j = i + 1;
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    let start = j;
    if j < chars.len() && (chars[j] == '+' || chars[j] == '-') {
        j += 1;
    }
    let digits = j;
    while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
        j += 1;
    }
    if j == digits {
        return None;
    }
    let number: String = chars[start..j].iter().collect();
    while j < chars.len() && chars[j].is_whitespace() {
        j += 1;
    }
    (j < chars.len() && chars[j] == ')').then_some((number, j + 1))
}

/// An extra-network tag of a prompt (`<lora:NAME:0.8>`), as A1111 reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    /// The network kind (`lora`, `lyco`, `hypernet`...).
    pub kind: String,
    /// The network's name.
    pub name: String,
    /// Positional arguments after the name (multipliers).
    pub positional: Vec<String>,
    /// `key=value` arguments (`lbw=OUTD`, `te=0.5`, `unet=1`).
    pub named: Vec<(String, String)>,
}

/// Takes A1111's extra-network tags (`<\w+:[^>]+>`) out of `text`, as A1111 does (the text
/// around them is left as it is): the prompt without them, and the tags in order.
pub fn extra_networks(text: &str) -> (String, Vec<Tag>) {
    let mut out = String::with_capacity(text.len());
    let mut tags = Vec::new();
    let mut rest = text;
    while let Some(lt) = rest.find('<') {
        let after = &rest[lt + 1..];
        let kind_len = after
            .char_indices()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
            .map_or(after.len(), |(i, _)| i);
        let tail = &after[kind_len..];
        let body_end = tail
            .strip_prefix(':')
            .and_then(|t| t.find('>').map(|e| (t, e)));
        match body_end {
            Some((t, e)) if kind_len > 0 && e > 0 => {
                let mut items = t[..e].split(':');
                let name = items.next().unwrap_or_default().to_string();
                let (mut positional, mut named) = (Vec::new(), Vec::new());
                for item in items {
                    match item.split_once('=') {
                        Some((k, v)) => named.push((k.trim().to_string(), v.trim().to_string())),
                        None => positional.push(item.trim().to_string()),
                    }
                }
                tags.push(Tag {
                    kind: after[..kind_len].to_string(),
                    name,
                    positional,
                    named,
                });
                out.push_str(&rest[..lt]);
                rest = &t[e + 1..];
            }
            _ => {
                out.push_str(&rest[..=lt]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    (out, tags)
}

/// Refuses syntax that A1111 reads as something other than text and mergesmith cannot do
/// yet, rather than encoding it as words.
fn refuse_unsupported(text: &str) -> Result<()> {
    let refuse = |what: &str| {
        Err(Error::Invalid(format!(
            "prompt `{text}`: {what} is not supported yet; write it without"
        )))
    };
    for tag in ["<lora:", "<lyco:", "<hypernet:"] {
        if text.contains(tag) {
            return refuse(
                "an extra network tag here (in a recipe's generate prompt, `<lora:NAME:W>` bakes \
                 the recipe's LoRA NAME; elsewhere declare a `lora` node and generate from it)",
            );
        }
    }
    if text.split_whitespace().any(|w| w == "AND") {
        return refuse("A1111's composable `AND`");
    }
    // `[from:to:when]`, `[to:when]` and `[a|b]`: a `:` or `|` directly inside square
    // brackets (escapes aside).
    let mut depth = 0usize;
    let mut escaped = false;
    let mut paren = 0usize;
    for c in text.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '(' => paren += 1,
            ')' => paren = paren.saturating_sub(1),
            ':' | '|' if depth > 0 && paren == 0 => {
                return refuse("A1111's prompt editing (`[from:to:when]`, `[a|b]`)")
            }
            _ => {}
        }
    }
    Ok(())
}

/// A chunk of 75 tokens framed to 77, with each token's weight.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// 77 token ids: start, the tokens, end, padding.
    pub ids: Vec<u32>,
    /// The weight of each position (1 for the frame and the padding).
    pub weights: Vec<f32>,
    /// Embeddings placed in the chunk: (position in `ids` of its first vector, its index in
    /// the embeddings given to [`chunks`]).
    pub fixes: Vec<(usize, usize)>,
}

/// The chunk being filled.
#[derive(Default)]
struct Open {
    tokens: Vec<u32>,
    weights: Vec<f32>,
    /// (position in `tokens`, embedding).
    fixes: Vec<(usize, usize)>,
}

/// The tokens of each piece, split into chunks as A1111 does (`comma` is the id of `,`;
/// `backtrack` how far back a comma may be to move the chunk's tail, A1111's default 20).
/// `embeddings` are (the token ids of an embedding's name, its vector count): where a name's
/// tokens appear, that many placeholder positions take them (a new chunk first when they do
/// not fit), longest name first, as A1111 does.
pub fn chunks(
    pieces: &[(Vec<u32>, f64)],
    breaks: &[bool],
    comma: Option<u32>,
    backtrack: usize,
    frame: (u32, u32, u32),
    embeddings: &[(Vec<u32>, usize)],
) -> Vec<Chunk> {
    const LEN: usize = 75;
    let (bos, eos, pad) = frame;
    let mut done: Vec<Chunk> = Vec::new();
    let mut open = Open::default();
    let mut last_comma: Option<usize> = None;
    let finish = |open: &mut Open, done: &mut Vec<Chunk>| {
        let o = std::mem::take(open);
        let mut ids = Vec::with_capacity(LEN + 2);
        ids.push(bos);
        ids.extend(o.tokens);
        ids.push(eos);
        ids.resize(LEN + 2, pad);
        let mut w = Vec::with_capacity(LEN + 2);
        w.push(1.0);
        w.extend(o.weights);
        w.resize(LEN + 2, 1.0);
        let fixes = o.fixes.into_iter().map(|(at, e)| (at + 1, e)).collect();
        done.push(Chunk {
            ids,
            weights: w,
            fixes,
        });
    };
    let mut by_length: Vec<usize> = (0..embeddings.len()).collect();
    by_length.sort_by_key(|&i| std::cmp::Reverse(embeddings[i].0.len()));
    for ((ids, weight), &is_break) in pieces.iter().zip(breaks) {
        if is_break {
            finish(&mut open, &mut done);
            last_comma = None;
            continue;
        }
        let mut position = 0;
        while position < ids.len() {
            let t = ids[position];
            if Some(t) == comma {
                last_comma = Some(open.tokens.len());
            } else if let Some(at) = last_comma.filter(|&at| {
                backtrack > 0 && open.tokens.len() == LEN && open.tokens.len() - at <= backtrack
            }) {
                let tail_t = open.tokens.split_off(at + 1);
                let tail_w = open.weights.split_off(at + 1);
                let tail_f: Vec<(usize, usize)> = open
                    .fixes
                    .iter()
                    .filter(|(p, _)| *p > at)
                    .map(|(p, e)| (p - at - 1, *e))
                    .collect();
                open.fixes.retain(|(p, _)| *p <= at);
                finish(&mut open, &mut done);
                open.tokens = tail_t;
                open.weights = tail_w;
                open.fixes = tail_f;
                last_comma = None;
            }
            if open.tokens.len() == LEN {
                finish(&mut open, &mut done);
                last_comma = None;
            }
            let found = by_length.iter().copied().find(|&e| {
                let name = &embeddings[e].0;
                !name.is_empty() && ids[position..].starts_with(name)
            });
            match found {
                None => {
                    open.tokens.push(t);
                    open.weights.push(*weight as f32);
                    position += 1;
                }
                Some(e) => {
                    let (name, rows) = (&embeddings[e].0, embeddings[e].1.min(LEN));
                    if open.tokens.len() + rows > LEN {
                        finish(&mut open, &mut done);
                        last_comma = None;
                    }
                    open.fixes.push((open.tokens.len(), e));
                    open.tokens.extend(std::iter::repeat_n(0, rows));
                    open.weights
                        .extend(std::iter::repeat_n(*weight as f32, rows));
                    position += name.len();
                }
            }
        }
    }
    if !open.tokens.is_empty() || done.is_empty() {
        finish(&mut open, &mut done);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &[(&str, f64)]) -> Vec<Piece> {
        v.iter()
            .map(|(t, w)| match *w == -1.0 {
                true => Piece::Break,
                false => Piece::Text(t.to_string(), *w),
            })
            .collect()
    }

    /// A1111's own doctests (`prompt_parser.parse_prompt_attention`), weights as Python
    /// computes them (the same float operations, so exactly equal).
    #[test]
    fn a1111_doctests() {
        let p = |s: &str| parse(s, Emphasis::A1111).unwrap();
        assert_eq!(p("normal text"), text(&[("normal text", 1.0)]));
        assert_eq!(
            p("an (important) word"),
            text(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(p("(unbalanced"), text(&[("unbalanced", 1.1)]));
        assert_eq!(p("\\(literal\\]"), text(&[("(literal]", 1.0)]));
        assert_eq!(
            p("(unnecessary)(parens)"),
            text(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            p("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            text(&[
                ("a ", 1.0),
                ("house", 1.573_000_000_000_000_4),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.464_100_000_000_000_6),
                (".", 1.1),
            ])
        );
    }

    /// More cases, weights worked out by A1111's rules.
    #[test]
    fn weights_breaks_and_escapes() {
        let p = |s: &str| parse(s, Emphasis::A1111).unwrap();
        assert_eq!(p(""), text(&[("", 1.0)]));
        assert_eq!(p("[a]"), text(&[("a", 1.0 / 1.1)]));
        assert_eq!(p("(a: 1.5 )"), text(&[("a", 1.5)]));
        assert_eq!(p("(a:-0.5)"), text(&[("a", -0.5)]));
        // A weight without an open bracket is text; a stray `)` too.
        assert_eq!(p("a:1.2) b)"), text(&[("a:1.2) b)", 1.0)]));
        assert_eq!(p("time: 3"), text(&[("time: 3", 1.0)]));
        assert_eq!(p("a\\\\b"), text(&[("a\\b", 1.0)]));
        assert_eq!(
            p("cat BREAK (dog)"),
            text(&[("cat", 1.0), ("BREAK", -1.0), ("", 1.0), ("dog", 1.1)])
        );
        // BREAK is a word: not inside another.
        assert_eq!(p("BREAKFAST"), text(&[("BREAKFAST", 1.0)]));
        // ComfyUI reads square brackets as text.
        assert_eq!(
            parse("[a] (b)", Emphasis::Comfyui).unwrap(),
            text(&[("[a] ", 1.0), ("b", 1.1)])
        );
        assert!(parse("(a:1.2.3)", Emphasis::A1111).is_err());
    }

    /// Syntax A1111 reads differently is refused, not encoded as words.
    #[test]
    fn unsupported_syntax_is_refused() {
        for s in [
            "a [cat:dog:10]",
            "a [cat|dog]",
            "a cat AND a dog",
            "a cat <lora:detail:0.5>",
        ] {
            let e = parse(s, Emphasis::A1111).unwrap_err().to_string();
            assert!(e.contains("not supported"), "{s}: {e}");
        }
        // Colons inside round brackets within squares are weights; escaped brackets text.
        assert!(parse("[(a:1.2)]", Emphasis::A1111).is_ok());
        assert!(parse("\\[a:b\\]", Emphasis::A1111).is_ok());
    }

    /// Extra-network tags come out as A1111 takes them out.
    #[test]
    fn extra_network_tags() {
        let (text, tags) = extra_networks("a cat <lora:style:0.8>, <lora:det:0.5:lbw=OUTD> x<y");
        assert_eq!(text, "a cat ,  x<y");
        assert_eq!(tags.len(), 2);
        assert_eq!(tags[0].kind, "lora");
        assert_eq!(tags[0].name, "style");
        assert_eq!(tags[0].positional, ["0.8"]);
        assert_eq!(tags[1].named, [("lbw".to_string(), "OUTD".to_string())]);
        let (text, tags) = extra_networks("<lora:plain> <:x> <a>");
        assert_eq!(text, " <:x> <a>");
        assert_eq!(tags[0].positional, Vec::<String>::new());
    }

    /// Chunking: 75 tokens, BREAK, and the comma backtrack.
    #[test]
    fn chunks_split_like_a1111() {
        let frame = (49406, 49407, 49407);
        let comma = Some(267);
        let one = |ids: Vec<u32>, w: f64| vec![(ids, w)];
        // 80 plain tokens: 75 + 5.
        let c = chunks(
            &one((1..=80).collect(), 1.0),
            &[false],
            comma,
            20,
            frame,
            &[],
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[1], 1);
        assert_eq!(c[0].ids[75], 75);
        assert_eq!(c[0].ids[76], 49407);
        assert_eq!(c[1].ids[1..6], [76, 77, 78, 79, 80]);
        assert_eq!(c[1].ids[6], 49407);
        // A comma at position 60 (0-based) of the chunk: tokens after it move on.
        let mut ids: Vec<u32> = (1..=80).collect();
        ids[60] = 267;
        let c = chunks(&one(ids.clone(), 1.2), &[false], comma, 20, frame, &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[61], 267);
        assert_eq!(c[0].ids[62], 49407);
        assert_eq!(c[1].ids[1], 62);
        assert_eq!(c[1].weights[1], 1.2);
        assert_eq!(c[0].weights[0], 1.0);
        assert_eq!(c[0].weights[62], 1.0);
        // A comma further back than 20 tokens does not move anything.
        ids[60] = 61;
        ids[40] = 267;
        let c = chunks(&one(ids, 1.0), &[false], comma, 20, frame, &[]);
        assert_eq!(c[1].ids[1], 76);
        // Exactly 75 tokens: one chunk; nothing: one empty chunk; BREAK: a new chunk.
        assert_eq!(
            chunks(
                &one((1..=75).collect(), 1.0),
                &[false],
                comma,
                20,
                frame,
                &[]
            )
            .len(),
            1
        );
        let empty = chunks(&one(vec![], 1.0), &[false], comma, 20, frame, &[]);
        assert_eq!(empty.len(), 1);
        assert_eq!(empty[0].ids[..3], [49406, 49407, 49407]);
        let pieces = vec![(vec![5, 6], 1.0), (vec![], 1.0), (vec![7], 1.1)];
        let c = chunks(&pieces, &[false, true, false], comma, 20, frame, &[]);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[..4], [49406, 5, 6, 49407]);
        assert_eq!(c[1].ids[..3], [49406, 7, 49407]);
        assert_eq!(c[1].weights[1], 1.1f64 as f32);
        // An embedding whose name is tokens [8, 9], 3 vectors: three placeholders take the
        // name's place, with the piece's weight; a longer name wins; one that does not fit
        // starts a new chunk.
        let embs = vec![(vec![8], 1), (vec![8, 9], 3)];
        let c = chunks(
            &[(vec![5, 8, 9, 6], 1.2)],
            &[false],
            comma,
            20,
            frame,
            &embs,
        );
        assert_eq!(c[0].ids[..7], [49406, 5, 0, 0, 0, 6, 49407]);
        assert_eq!(c[0].fixes, vec![(2, 1)]);
        assert_eq!(c[0].weights[2..5], [1.2f64 as f32; 3]);
        let mut long: Vec<u32> = (100..173).collect();
        long.extend([8, 9]);
        let c = chunks(&[(long, 1.0)], &[false], None, 20, frame, &embs);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ids[73..75], [172, 49407]);
        assert_eq!(c[1].fixes, vec![(1, 1)]);
        assert_eq!(c[1].ids[1..5], [0, 0, 0, 49407]);
    }
}
