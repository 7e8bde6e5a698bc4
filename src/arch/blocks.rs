//! MBW block lists and the key -> block rules of SuperMerger (supermerger.md §3).

use std::sync::LazyLock;

/// The 26 blocks of SD1.x / SD2.x (and the SDXL refiner): BASE, IN00-IN11, M00, OUT00-OUT11.
pub static SD_BLOCKS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut v = vec!["BASE".to_string()];
    v.extend((0..12).map(|i| format!("IN{i:02}")));
    v.push("M00".into());
    v.extend((0..12).map(|i| format!("OUT{i:02}")));
    v
});

/// The 20 blocks of SDXL: BASE, IN00-IN08, M00, OUT00-OUT08.
pub static SDXL_BLOCKS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut v = vec!["BASE".to_string()];
    v.extend((0..9).map(|i| format!("IN{i:02}")));
    v.push("M00".into());
    v.extend((0..9).map(|i| format!("OUT{i:02}")));
    v
});

/// The 110 fine-grained SDXL block names ("extended XL"), in vector order.
pub static SDXL_EXTENDED_BLOCKS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut v: Vec<String> = [
        "CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40", "IN41",
    ]
    .map(String::from)
    .to_vec();
    let tb = |v: &mut Vec<String>, prefix: &str, n: usize| {
        v.extend((0..n).map(|i| format!("{prefix}{i}")))
    };
    tb(&mut v, "IN41", 2);
    v.extend(["IN50", "IN51"].map(String::from));
    tb(&mut v, "IN51", 2);
    v.extend(["IN60", "IN70", "IN71"].map(String::from));
    tb(&mut v, "IN71", 10);
    v.extend(["IN80", "IN81"].map(String::from));
    tb(&mut v, "IN81", 10);
    v.extend(["MID00", "MID10"].map(String::from));
    tb(&mut v, "MID10", 10);
    v.extend(["MID20", "OUT00", "OUT01"].map(String::from));
    tb(&mut v, "OUT01", 10);
    v.extend(["OUT10", "OUT11"].map(String::from));
    tb(&mut v, "OUT11", 10);
    v.extend(["OUT20", "OUT21"].map(String::from));
    tb(&mut v, "OUT21", 10);
    v.extend(["OUT22", "OUT30", "OUT31"].map(String::from));
    tb(&mut v, "OUT31", 2);
    v.extend(["OUT40", "OUT41"].map(String::from));
    tb(&mut v, "OUT41", 2);
    v.extend(["OUT50", "OUT51"].map(String::from));
    tb(&mut v, "OUT51", 2);
    v.extend(
        [
            "OUT52", "OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE",
        ]
        .map(String::from),
    );
    v
});

/// Number after `.{section}.` in a key, e.g. `input_blocks` in `...input_blocks.4.1...` -> 4.
fn index_after(key: &str, section: &str) -> Option<usize> {
    let pat = format!(".{section}.");
    let rest = &key[key.find(&pat)? + pat.len()..];
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    if digits.is_empty() || !rest[digits.len()..].starts_with('.') {
        return None;
    }
    digits.parse().ok()
}

/// SD1/SD2 rule (first match wins): `time_embed` -> IN00, `.out.` -> OUT11,
/// `.input_blocks.N.` -> IN{N}, `.middle_block.N.` -> M00, `.output_blocks.N.` -> OUT{N},
/// anything else -> BASE.
pub fn sd_block(key: &str) -> String {
    if key.contains("time_embed") {
        return "IN00".into();
    }
    if key.contains(".out.") {
        return "OUT11".into();
    }
    if let Some(n) = index_after(key, "input_blocks") {
        return format!("IN{n:02}");
    }
    if index_after(key, "middle_block").is_some() {
        return "M00".into();
    }
    if let Some(n) = index_after(key, "output_blocks") {
        return format!("OUT{n:02}");
    }
    "BASE".into()
}

/// SDXL rule: `(fine name, 20-list block)`, or `None` for keys that are never merged
/// (no `weight`/`bias` in the name).
pub fn sdxl_block(key: &str) -> Option<(String, String)> {
    if !(key.contains("weight") || key.contains("bias")) {
        return None;
    }
    let pair = |f: &str, b: &str| Some((f.to_string(), b.to_string()));
    if key.contains("label_emb") {
        return pair("LABEL", "IN00");
    }
    if key.contains("time_embed") {
        return pair("TIME", "IN00");
    }
    if key.contains("conditioner.embedders.0.") {
        return pair("CLIPL", "BASE");
    }
    if key.contains("conditioner.embedders.1.") {
        return pair("CLIPG", "BASE");
    }
    if key.contains("first_stage_model") {
        return pair("VAE", "BASE");
    }
    if key.contains("model.diffusion_model.out.") {
        return pair("OUT9", "OUT08");
    }
    let Some(rest) = key.strip_prefix("model.diffusion_model.") else {
        return pair("BASE", "BASE");
    };
    let kind = ["input", "middle", "output"]
        .into_iter()
        .find(|k| rest.contains(k));
    let Some(kind) = kind else {
        return pair("BASE", "BASE");
    };
    let digits: String = rest.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut chars = digits.chars();
    let first = chars.next().unwrap_or('0');
    let (fine_kind, number) = match kind {
        "input" => ("IN", format!("{first}{}", chars.next().unwrap_or('0'))),
        "middle" => ("MID", format!("{first}0")),
        _ => ("OUT", format!("{first}{}", chars.next().unwrap_or('0'))),
    };
    let mut fine = format!("{fine_kind}{number}");
    if let Some(n) = index_after(rest, "transformer_blocks") {
        fine.push_str(&n.to_string());
    }
    let block = match kind {
        "input" => format!("IN0{first}"),
        "middle" => "M00".to_string(),
        _ => format!("OUT0{first}"),
    };
    Some((fine, block))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_sizes() {
        assert_eq!(SD_BLOCKS.len(), 26);
        assert_eq!(SDXL_BLOCKS.len(), 20);
        assert_eq!(SDXL_EXTENDED_BLOCKS.len(), 110);
        let mut names = SDXL_EXTENDED_BLOCKS.clone();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 110, "extended names are unique");
    }

    #[test]
    fn sd_rules() {
        assert_eq!(
            sd_block("model.diffusion_model.time_embed.0.weight"),
            "IN00"
        );
        assert_eq!(sd_block("model.diffusion_model.out.2.bias"), "OUT11");
        assert_eq!(
            sd_block("model.diffusion_model.input_blocks.11.0.in_layers.0.weight"),
            "IN11"
        );
        assert_eq!(
            sd_block("model.diffusion_model.middle_block.2.out_layers.3.weight"),
            "M00"
        );
        assert_eq!(
            sd_block("model.diffusion_model.output_blocks.5.2.conv.weight"),
            "OUT05"
        );
        assert_eq!(
            sd_block("first_stage_model.decoder.up.0.block.0.conv1.weight"),
            "BASE"
        );
        assert_eq!(
            sd_block("cond_stage_model.transformer.text_model.final_layer_norm.bias"),
            "BASE"
        );
    }

    #[test]
    fn sdxl_rules_from_spec() {
        let f = |k: &str| sdxl_block(k).unwrap();
        assert_eq!(
            f("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"),
            ("IN410".into(), "IN04".into())
        );
        assert_eq!(
            f("model.diffusion_model.middle_block.1.transformer_blocks.3.attn1.to_q.weight"),
            ("MID103".into(), "M00".into())
        );
        assert_eq!(
            f("model.diffusion_model.output_blocks.0.1.transformer_blocks.9.ff.net.2.bias"),
            ("OUT019".into(), "OUT00".into())
        );
        assert_eq!(
            f("model.diffusion_model.label_emb.0.0.weight"),
            ("LABEL".into(), "IN00".into())
        );
        assert_eq!(
            f("model.diffusion_model.out.2.weight"),
            ("OUT9".into(), "OUT08".into())
        );
        assert_eq!(
            f("first_stage_model.encoder.conv_in.bias"),
            ("VAE".into(), "BASE".into())
        );
        assert_eq!(
            sdxl_block("conditioner.embedders.1.model.logit_scale"),
            None
        );
    }

    #[test]
    fn every_sdxl_fine_name_is_in_the_extended_list() {
        let table = include_str!("../../data/layouts/sdxl-sgm.tsv");
        for line in table.lines().skip(1) {
            let key = line.split('\t').nth(1).unwrap();
            if let Some((fine, _)) = sdxl_block(key) {
                assert!(SDXL_EXTENDED_BLOCKS.contains(&fine), "{key} -> {fine}");
            }
        }
    }
}
