//! SDXL's key -> block rule (supermerger.md §3.3), the one block rule the family data
//! (`data/families/sdxl.yaml`) cannot express: fine names built from every digit of the key.

use super::family::index_after;

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

    use crate::arch::Family;

    fn sd_block(key: &str) -> String {
        Family::named("sd1").unwrap().block_in(0, key).unwrap()
    }

    #[test]
    fn list_sizes() {
        let n = |f: &str, i: usize| Family::named(f).unwrap().lists()[i].slots.len();
        assert_eq!(
            (n("sd1", 0), n("sd2", 0), n("sdxl_refiner", 0)),
            (26, 26, 26)
        );
        assert_eq!((n("sdxl", 0), n("sdxl", 1)), (20, 110));
        assert_eq!((n("flux", 0), n("flux", 1)), (61, 63));
        assert_eq!((n("sd3", 0), n("sd3", 1)), (30, 44));
        let sd = Family::named("sd1").unwrap().blocks();
        assert_eq!(
            (
                sd[0].as_str(),
                sd[12].as_str(),
                sd[13].as_str(),
                sd[25].as_str()
            ),
            ("BASE", "IN11", "M00", "OUT11")
        );
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
        let ext = &Family::named("sdxl").unwrap().lists()[1].slots;
        let table = include_str!("../../data/layouts/sdxl-sgm.tsv");
        for line in table.lines().skip(1) {
            let key = line.split('\t').nth(1).unwrap();
            if let Some((fine, _)) = sdxl_block(key) {
                assert!(ext.contains(&fine), "{key} -> {fine}");
            }
        }
    }
}
