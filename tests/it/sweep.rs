//! XY(Z) sweeps: axis parsing per type (values and errors), cell expansion, cache sharing
//! between cells, and grids built from cached cell images.

use std::path::Path;

use mergesmith::arch::Family;
use mergesmith::build::{self, BuildOptions, Status};
use mergesmith::merge::{CalcMode, Ratio};
use mergesmith::nodes::generate::GenerateNode;
use mergesmith::nodes::lora::LoraNode;
use mergesmith::nodes::merge::MergeNode;
use mergesmith::nodes::xy::XyNode;
use mergesmith::nodes::{Input, Node};
use mergesmith::recipe;
use mergesmith::store::Cache;

const BASE: &str = concat!(
    "version: 1
models:
  a: { path: a.safetensors }
  b: { path: b.safetensors }
  c: { path: c.safetensors }
nodes:
",
    preview_nodes!(),
    "  sweep:
    xy:
      generate: look
"
);

fn parse(axes: &str) -> Result<recipe::Recipe, String> {
    recipe::parse(Path::new("r.yaml"), &format!("{BASE}{axes}")).map_err(|e| e.to_string())
}

fn grids(r: &recipe::Recipe) -> Vec<mergesmith::nodes::xy::Grid> {
    match &r.nodes["sweep"] {
        Node::Xy(XyNode { grids, .. }) => grids.clone(),
        _ => panic!("not a sweep"),
    }
}

/// The merge spec and job of cell `i`.
fn cell(
    r: &recipe::Recipe,
    i: usize,
) -> (
    &mergesmith::merge::MergeSpec,
    &[Input],
    &mergesmith::gen::job::Job,
) {
    let Node::Generate(GenerateNode { job, model, .. }) = &r.nodes[&format!("sweep.{i}.look")]
    else {
        panic!("no cell {i}");
    };
    let merge = model.node().unwrap();
    let Node::Merge(MergeNode { spec, inputs, .. }) = &r.nodes[merge] else {
        panic!("no merge for cell {i}");
    };
    (spec, inputs, job)
}

#[test]
fn axes_expand_into_cells_with_their_values() {
    let r = parse(
        "      x: { type: alpha, values: \"0.2, 0.4,0.6\" }\n      y: { type: seed, values: [1, 2] }\n      z: { type: prompt, values: \"a cat\\na dog\" }\n",
    )
    .unwrap();
    let g = grids(&r);
    assert_eq!(g.len(), 2, "one grid per Z value");
    assert_eq!(g[0].x_labels, ["alpha = 0.2", "0.4", "0.6"]);
    assert_eq!(g[0].y_labels, ["seed = 1", "2"]);
    assert_eq!(g[1].z_label.as_deref(), Some("prompt = a dog"));
    assert_eq!(g[0].cells.len(), 6);
    assert_eq!(
        (g[0].name.as_str(), g[1].name.as_str()),
        ("sweep-z0", "sweep-z1")
    );
    assert!(
        g[0].header.starts_with("Weight sum A=a B=b, alpha=X"),
        "{}",
        g[0].header
    );
    // Cells are row-major, X fastest: cell 4 is x = 0.4, y = 2, z = "a cat".
    let (spec, _, job) = cell(&r, 4);
    assert_eq!(spec.alpha, Ratio::Scalar(0.4));
    assert_eq!((job.seed, job.prompt.as_str()), (2, "a cat"));
    let (_, _, job) = cell(&r, 7);
    assert_eq!(job.prompt, "a dog");
    // The swept node itself is untouched.
    let Node::Merge(MergeNode { spec, .. }) = &r.nodes["blend"] else {
        panic!()
    };
    assert_eq!(spec.alpha, Ratio::Scalar(0.5));

    // `|` splits an axis into parts, each its own grid.
    let r = parse("      x: { type: alpha, values: \"0.2,0.4|0.6\" }\n").unwrap();
    let g = grids(&r);
    assert_eq!(
        g.iter()
            .map(|g| (g.name.as_str(), g.cells.len()))
            .collect::<Vec<_>>(),
        [("sweep-part1", 2), ("sweep-part2", 1)]
    );
}

#[test]
fn every_axis_type_sets_what_it_names() {
    let one = |axis: &str| parse(&format!("      x: {axis}\n")).unwrap();
    let r = one("{ type: beta, values: [0.3] }");
    assert_eq!(cell(&r, 0).0.beta, Some(Ratio::Scalar(0.3)));
    let r = one("{ type: alpha_and_beta, values: \"0.1 0.2, 0.7\" }");
    assert_eq!(cell(&r, 0).0.alpha, Ratio::Scalar(0.1));
    assert_eq!(cell(&r, 0).0.beta, Some(Ratio::Scalar(0.2)));
    assert_eq!(cell(&r, 1).0.beta, Some(Ratio::Scalar(0.7)));
    let r = one("{ type: mbw_alpha, values: \"GRAD_V\\n0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1\" }");
    assert!(matches!(&cell(&r, 0).0.alpha, Ratio::Blocks(v) if v.len() == 26));
    assert!(matches!(&cell(&r, 1).0.alpha, Ratio::Blocks(v) if v[1] == 1.0));
    let r = one("{ type: mbw_beta, values: [[0.1, 0.2]] }");
    assert_eq!(cell(&r, 0).0.beta, Some(Ratio::Blocks(vec![0.1, 0.2])));
    let r = one("{ type: model_b, values: \"c, a\" }");
    assert_eq!(cell(&r, 0).1[1], Input::Model("c".into()));
    assert_eq!(cell(&r, 1).1[1], Input::Model("a".into()));
    let r = one("{ type: model_a, values: [c] }");
    assert_eq!(cell(&r, 0).1[0], Input::Model("c".into()));
    let r = one("{ type: include_blocks, values: \"IN00 IN01, OUT05-OUT11\" }");
    let f = cell(&r, 1).0.filter.clone().unwrap();
    assert_eq!(
        (f.mode, f.blocks.as_str()),
        (
            mergesmith::merge::select::FilterMode::Include,
            "OUT05-OUT11"
        )
    );
    let r = one("{ type: exclude_blocks, values: [M00] }");
    assert_eq!(
        cell(&r, 0).0.filter.clone().unwrap().mode,
        mergesmith::merge::select::FilterMode::Exclude
    );
    let r = one("{ type: elemental, values: \"IN04:attn1:0.3\\n\\nOUT05::0.9\" }");
    assert_eq!(cell(&r, 0).0.elemental.as_deref(), Some("IN04:attn1:0.3"));
    assert_eq!(cell(&r, 1).0.elemental.as_deref(), Some("OUT05::0.9"));
    let r = one("{ type: adjust, values: \"0,0,0,0,0.1,0,0,0\\n1,0,0,0,0,0,0,0\" }");
    assert_eq!(cell(&r, 1).0.adjust, Some([1., 0., 0., 0., 0., 0., 0., 0.]));
    let r = one("{ type: calcmode, values: \"trainDifference, cosineA\" }");
    assert_eq!(cell(&r, 0).0.calcmode, CalcMode::TrainDifference);
    let r = one("{ type: negative, values: [blurry] }");
    assert_eq!(cell(&r, 0).2.negative, "blurry");
    let r = one("{ type: steps, values: \"3, 5\" }");
    assert_eq!(cell(&r, 1).2.steps, 5);
    let r = one("{ type: cfg, values: [4.5] }");
    assert_eq!(cell(&r, 0).2.cfg, 4.5);
    let r = one("{ type: sampler, values: \"euler, dpmpp_2m\" }");
    assert_eq!(
        cell(&r, 1).2.sampler,
        mergesmith::gen::sampler::Sampler::DpmPp2m
    );
    // A1111's labels work as values (its XY grid writes them).
    let r = one("{ type: sampler, values: \"DPM++ 2M SDE, heun\" }");
    assert_eq!(
        cell(&r, 0).2.sampler,
        mergesmith::gen::sampler::Sampler::DpmPp2mSde
    );
    assert_eq!(
        cell(&r, 1).2.sampler,
        mergesmith::gen::sampler::Sampler::Heun
    );
    let r = one("{ type: schedule, values: \"karras, beta\" }");
    assert_eq!(
        cell(&r, 1).2.schedule,
        Some(mergesmith::gen::sampler::ScheduleKind::Beta)
    );
    let r = one("{ type: noise, values: [nv, comfyui] }");
    assert_eq!(cell(&r, 0).2.noise, mergesmith::gen::noise::NoiseSource::Nv);
    let r = one("{ type: emphasis, values: [no_norm] }");
    assert_eq!(
        cell(&r, 0).2.emphasis,
        mergesmith::gen::prompt::Emphasis::NoNorm
    );
    let e = parse("      x: { type: prompt, values: [\"a [cat:dog:3]\"] }\n").unwrap_err();
    assert!(e.contains("prompt editing"), "{e}");
    let e = parse("      x: { type: schedule, values: [karas] }\n").unwrap_err();
    assert!(
        e.contains("`karas` is not a schedule (normal, karras"),
        "{e}"
    );
    let r = one("{ type: clip_skip, values: [2] }");
    assert_eq!(cell(&r, 0).2.clip_skip, 2);
    let r = one("{ type: width, values: [96] }");
    assert_eq!(cell(&r, 0).2.width, Some(96));
    let r = one("{ type: height, values: [32] }");
    assert_eq!(cell(&r, 0).2.height, Some(32));
    // add_elemental appends to the merge's own text; X and Y may both be it.
    let r = parse("      x: { type: add_elemental, values: [\"IN00::0.1\"] }\n      y: { type: add_elemental, values: [\"OUT00::0.2\"] }\n").unwrap();
    assert_eq!(
        cell(&r, 0).0.elemental.as_deref(),
        Some("IN00::0.1\nOUT00::0.2")
    );
}

#[test]
fn pinpoint_blocks_give_the_alpha_axis_value_to_the_named_blocks() {
    let r = parse("      x: { type: pinpoint_blocks, values: \"IN01, NOT IN01, OUT00-OUT02\" }\n      y: { type: alpha, values: [1] }\n").unwrap();
    let blocks = |i: usize| match &cell(&r, i).0.alpha {
        Ratio::Blocks(v) => v.clone(),
        other => panic!("{other:?}"),
    };
    // SD1's 26 blocks: BASE, IN00..IN11, M00, OUT00..OUT11; the base alpha is 0.5.
    let mut want = vec![0.5; 26];
    want[2] = 1.0;
    assert_eq!(blocks(0), want);
    let not: Vec<f64> = (0..26).map(|i| if i == 2 { 0.5 } else { 1.0 }).collect();
    assert_eq!(blocks(1), not);
    assert_eq!(blocks(2)[14..17], [1.0, 1.0, 1.0]);
    assert_eq!(blocks(2).iter().filter(|v| **v == 1.0).count(), 3);
    // ALL: one column per block, in SuperMerger's two parts (BASE-M00, OUT00-OUT11).
    let r = parse(
        "      x: { type: pinpoint_blocks, values: ALL }\n      y: { type: alpha, values: [0] }\n",
    )
    .unwrap();
    let g = grids(&r);
    assert_eq!((g.len(), g[0].cells.len(), g[1].cells.len()), (2, 14, 12));
    assert_eq!(g[0].x_labels[0], "pinpoint_blocks = BASE");
    assert_eq!(g[1].x_labels.last().map(String::as_str), Some("OUT11"));
}

#[test]
fn pinpointed_elements_adjust_slots_and_lora_axes() {
    let r = parse("      x: { type: pinpoint_element, values: \"IN04:attn1, OUT05:\" }\n      y: { type: alpha, values: [0.8] }\n").unwrap();
    assert_eq!(cell(&r, 0).0.elemental.as_deref(), Some("IN04:attn1:0.8"));
    assert_eq!(cell(&r, 1).0.elemental.as_deref(), Some("OUT05::0.8"));
    // The alpha axis gave its value to the elements: the merge's alpha stays.
    assert_eq!(cell(&r, 1).0.alpha, Ratio::Scalar(0.5));
    // The effective checker prepends a baseline without the element and flags its grid.
    let r = parse("      x: { type: effective, values: [\"IN04:attn1\"] }\n      y: { type: alpha, values: [0.8] }\n").unwrap();
    let g = grids(&r);
    assert!(g[0].effective);
    assert_eq!(g[0].x_labels, ["effective = baseline", "IN04:attn1"]);
    assert_eq!(cell(&r, 0).0.elemental, None);
    assert_eq!(cell(&r, 1).0.elemental.as_deref(), Some("IN04:attn1:0.8"));
    let e = parse("      x: { type: effective, values: [\"IN04:attn1\"] }\n      y: { type: alpha, values: [0.8, 0.9] }\n").unwrap_err();
    assert!(e.contains("takes one value"), "{e}");
    let r = parse("      x: { type: pinpoint_adjust, values: \"CONT, ALL\" }\n      y: { type: alpha, values: [2] }\n").unwrap();
    assert_eq!(cell(&r, 0).0.adjust, Some([0., 0., 0., 2., 0., 0., 0., 0.]));
    assert_eq!(cell(&r, 1).0.adjust, Some([2., 2., 2., 2., 0., 2., 2., 2.]));
    // The whole text ALL: SuperMerger's seven columns (every slot but BRI).
    let r = parse(
        "      x: { type: pinpoint_adjust, values: ALL }\n      y: { type: alpha, values: [2] }\n",
    )
    .unwrap();
    assert_eq!(
        grids(&r)[0].x_labels,
        [
            "pinpoint_adjust = IN",
            "OUT",
            "OUT2",
            "CONT",
            "COL1",
            "COL2",
            "COL3"
        ]
    );
    assert_eq!(cell(&r, 5).0.adjust, Some([0., 0., 0., 0., 0., 0., 2., 0.]));
    let e = parse("      x: { type: pinpoint_adjust, values: [HUE] }\n      y: { type: alpha, values: [2] }\n").unwrap_err();
    assert!(e.contains("`HUE` is not an adjust slot"), "{e}");
    // LoRA axes change the lora node the generate node reads.
    let text = BASE
        .replace(
            "  c: { path: c.safetensors }\n",
            "  c: { path: c.safetensors }\n  style: { path: style.safetensors }\n",
        )
        .replace("      model: blend\n", "      model: styled\n")
        .replace(
            "  look:\n",
            "  styled:\n    lora: blend\n    apply: [{ file: style, strength: 1 }]\n  look:\n",
        );
    let r = recipe::parse(
        Path::new("r.yaml"),
        &format!("{text}      x: {{ type: lora_strength, values: \"0.5, 1.5\" }}\n      y: {{ type: lora_blocks, values: \"OUTD\\nINALL\" }}\n"),
    )
    .unwrap();
    let Node::Lora(LoraNode { loras, input, .. }) = &r.nodes["sweep.3.styled"] else {
        panic!()
    };
    assert_eq!(
        (loras[0].strength, loras[0].blocks.as_deref()),
        (1.5, Some("INALL"))
    );
    // Only the LoRA changes: the cells read the original merge.
    assert_eq!(input, &Input::Node("blend".into()));
    let e = parse("      x: { type: lora_strength, values: [1] }\n").unwrap_err();
    assert!(
        e.contains("lora_strength changes a `lora` node, and `look` does not read one"),
        "{e}"
    );
}

#[test]
fn path_axes_and_paired_vectors() {
    let r = parse("      x: { path: look.cfg, values: [4, 8] }\n      y: { type: prompt2, values: \"a cat\\nwith a hat\\n\\na dog\" }\n").unwrap();
    assert_eq!(cell(&r, 1).2.cfg, 8.0);
    assert_eq!(cell(&r, 2).2.prompt, "a dog");
    assert_eq!(cell(&r, 0).2.prompt, "a cat\nwith a hat");
    // Only the generate node is copied: the cells read the original merge.
    let Node::Generate(GenerateNode { model, .. }) = &r.nodes["sweep.0.look"] else {
        panic!()
    };
    assert_eq!(model, &Input::Node("blend".into()));
    // A merge further up: every node between it and the generate node is copied.
    let two = BASE
        .replace("      model: blend\n", "      model: second\n")
        .replace(
            "  look:\n",
            "  second:\n    merge: weight_sum\n    a: blend\n    b: c\n    alpha: 0.3\n  look:\n",
        );
    let parse2 = |axes: &str| recipe::parse(Path::new("r.yaml"), &format!("{two}{axes}"));
    let r = parse2("      x: { path: blend.alpha, values: [0.1, 0.9] }\n      y: { type: beta, node: second, values: [0.2] }\n").unwrap();
    let Node::Merge(MergeNode { spec, inputs, .. }) = &r.nodes["sweep.1.second"] else {
        panic!()
    };
    assert_eq!(inputs[0], Input::Node("sweep.1.blend".into()));
    assert_eq!(
        (spec.alpha.clone(), spec.beta.clone()),
        (Ratio::Scalar(0.3), Some(Ratio::Scalar(0.2)))
    );
    let Node::Merge(MergeNode { spec, .. }) = &r.nodes["sweep.1.blend"] else {
        panic!()
    };
    assert_eq!(spec.alpha, Ratio::Scalar(0.9));
    // Without `node:`, merge axes change the merge the generate node reads.
    let r = parse2("      x: { type: alpha, values: [0.6] }\n").unwrap();
    assert!(!r.nodes.contains_key("sweep.0.blend"));
    let Node::Merge(MergeNode { spec, .. }) = &r.nodes["sweep.0.second"] else {
        panic!()
    };
    assert_eq!(spec.alpha, Ratio::Scalar(0.6));
    let e = parse2("      x: { path: blend.colour, values: [1] }\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`colour` is not a parameter a sweep can change"),
        "{e}"
    );
    let e = parse2("      x: { path: look.alpha, values: [1] }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`look` is not a merge node"), "{e}");
    let e = parse2("      x: { type: alpha }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("values"), "{e}");
    let e = parse2("      x: { values: [1] }\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs either `type` or `path`"), "{e}");
    // mbw alpha and beta: lines in pairs.
    let r = parse(
        "      x: { type: mbw_alpha_and_beta, values: \"GRAD_V\\nGRAD_A\\nFLAT_25\\nFLAT_75\" }\n",
    )
    .unwrap();
    assert_eq!(
        grids(&r)[0].x_labels[0],
        "mbw_alpha_and_beta = alpha:(GRAD_V),beta(GRAD_A)"
    );
    assert!(matches!(&cell(&r, 1).0.beta, Some(Ratio::Blocks(v)) if v.len() == 26));
    let e = parse("      x: { type: mbw_alpha_and_beta, values: \"GRAD_V\" }\n").unwrap_err();
    assert!(e.contains("in pairs"), "{e}");
}

#[test]
fn random_merges_are_seeded() {
    let r = parse(
        "      x: { type: random, values: 3, seed: 7 }\n      y: { type: seed, values: [1, 2] }\n",
    )
    .unwrap();
    let alpha = |i| match &cell(&r, i).0.alpha {
        Ratio::Blocks(v) => v.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        grids(&r)[0].x_labels,
        ["random = #1 (seed 7)", "#2 (seed 8)", "#3 (seed 9)"]
    );
    assert_eq!(alpha(0).len(), 26);
    // SuperMerger's "R" with seed 8: numpy's RandomState(8).rand() rounded to 3 decimals
    // (numpy 2.4: 0.873, 0.969, 0.869, 0.531, 0.233, ...).
    assert_eq!(&alpha(1)[..5], &[0.873, 0.969, 0.869, 0.531, 0.233]);
    assert!(alpha(0)
        .iter()
        .all(|v| (0.0..1.0).contains(v) && (v * 1000.0).fract() == 0.0));
    assert_ne!(alpha(0), alpha(1));
    // The same column in every row; the same weights for the same seed, others for another.
    assert_eq!(alpha(0), alpha(3));
    let again = parse("      x: { type: random, values: \"3\", seed: 7 }\n").unwrap();
    assert_eq!(cell(&again, 2).0.alpha, cell(&r, 2).0.alpha);
    let other = parse("      x: { type: random, values: 3, seed: 8 }\n").unwrap();
    assert_ne!(cell(&other, 0).0.alpha, cell(&r, 0).0.alpha);
    let e = parse("      x: { type: random, values: [1, 2] }\n").unwrap_err();
    assert!(e.contains("a random axis takes one count"), "{e}");
}

#[test]
fn bad_axes_are_errors_with_positions() {
    let err = |axes: &str| parse(axes).unwrap_err();
    let e = err("      x: { type: alpha, values: \"0.2, x\" }\n");
    assert!(
        e.contains("r.yaml:22:10") && e.contains("alpha axis"),
        "{e}"
    );
    let e = err("      x: { type: seed, values: [1.5] }\n");
    assert!(e.contains("`1.5` is not a seed"), "{e}");
    let e = err("      x: { type: model_b, values: [nope] }\n");
    assert!(e.contains("`nope` is not a model or node"), "{e}");
    let e = err("      x: { type: pinpoint_blocks, values: [IN99] }\n      y: { type: alpha, values: [1] }\n");
    assert!(e.contains("unknown block `IN99`"), "{e}");
    let e = err("      x: { type: pinpoint_blocks, values: [IN01] }\n");
    assert!(
        e.contains("pinpoint_blocks needs an alpha (or beta) axis"),
        "{e}"
    );
    let e = err("      x: { type: seed, values: [1] }\n      y: { type: seed, values: [2] }\n");
    assert!(e.contains("axes x and y both sweep seed"), "{e}");
    let e = err("      x: { type: adjust, values: \"1,2,3\" }\n");
    assert!(e.contains("an adjust vector has 8 values"), "{e}");
    let e = err("      x: { type: calcmode, values: [bogus] }\n");
    assert!(e.contains("calcmode axis"), "{e}");
    let e = err("      x: { type: width, values: [60] }\n");
    assert!(e.contains("60 is not an image size"), "{e}");
    let e = err("      x: { type: alpha, values: \"\" }\n");
    assert!(e.contains("the alpha axis has no values"), "{e}");
    let e = err("      x: { type: colour, values: [1] }\n");
    assert!(e.contains("unknown variant `colour`"), "{e}");
    let e = recipe::parse(
        Path::new("r.yaml"),
        &format!("{BASE}      x: {{ type: seed, values: [1] }}\n  m:\n    merge: weight_sum\n    a: a\n    b: sweep\n    alpha: 0.5\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`sweep` makes images"), "{e}");
}

#[test]
fn a_pinpoint_sweep_recomputes_only_the_pinpointed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        crate::common::synth(
            d,
            &format!("{name}.safetensors"),
            &crate::common::tiny(Family::builtin("sd1"), seed),
        );
    }
    let path = d.join("r.yaml");
    std::fs::write(
        &path,
        format!("{BASE}      x: {{ type: pinpoint_blocks, values: \"IN01, IN02, M00, OUT03, OUT11\" }}\n      y: {{ type: alpha, values: [1] }}\n"),
    )
    .unwrap();
    let r = recipe::load(&path).unwrap();
    let cache = Cache::new(&d.join("cache"));
    // The swept merge first (a full merge), then only the cells' merges: no generation.
    let full = build::build(&r, &cache, &["blend".into()], &BuildOptions::default()).unwrap();
    let total = full[0].stored.unwrap() + full[0].reused.unwrap();
    let targets: Vec<String> = (0..5).map(|i| format!("sweep.{i}.blend")).collect();
    let reports = build::build(&r, &cache, &targets, &BuildOptions::default()).unwrap();
    let ck = mergesmith::checkpoint::Checkpoint::open(d.join("a.safetensors")).unwrap();
    let in_block = |b: &str| {
        ck.tensors()
            .iter()
            .filter(|t| {
                mergesmith::arch::Family::builtin("sd1")
                    .block_in(0, &t.name)
                    .unwrap()
                    == b
            })
            .count()
    };
    for (i, block) in ["IN01", "IN02", "M00", "OUT03", "OUT11"].iter().enumerate() {
        let rep = reports.iter().find(|r| r.plan.name == targets[i]).unwrap();
        assert!(matches!(rep.plan.status, Status::Miss(_)));
        assert_eq!(rep.stored, Some(in_block(block)), "{block}");
        assert_eq!(rep.stored.unwrap() + rep.reused.unwrap(), total);
        assert!(
            rep.stored.unwrap() > 0 && rep.stored.unwrap() * 5 < total,
            "{block}"
        );
    }
}

#[test]
fn a_sweep_builds_grids_from_cached_cells_and_then_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::small_models(d, &["a", "b", "c"]);
    let path = d.join("r.yaml");
    let text = BASE.replace("    alpha: 0.5\n", "    alpha: 0.5\n    cache: memory\n");
    std::fs::write(
        &path,
        format!("{text}      x: {{ type: alpha, values: [0.25, 0.75] }}\n      y: {{ type: seed, values: \"3, 4\" }}\n    to: grids\n"),
    )
    .unwrap();
    let r = recipe::load(&path).unwrap();
    let cache = Cache::new(&d.join("cache"));
    let first = build::build(&r, &cache, &["sweep".into()], &BuildOptions::default()).unwrap();
    let made = |reports: &[build::NodeReport], n: &str| {
        reports
            .iter()
            .find(|r| r.plan.name == n)
            .and_then(|r| r.stored)
    };
    assert_eq!(made(&first, "sweep"), Some(1));
    // Two alphas: two merges (the seed axis reuses them), four images.
    let merges = first
        .iter()
        .filter(|r| r.plan.name.ends_with(".blend") && r.stored.is_some_and(|s| s > 0))
        .count();
    assert_eq!(merges, 2);
    let images: usize = first
        .iter()
        .filter(|r| r.plan.name.ends_with(".look"))
        .filter_map(|r| r.stored)
        .sum();
    assert_eq!(images, 4);
    let grid = image::open(d.join("grids/sweep.png")).unwrap().to_rgb8();
    let cell_image = |node: &str| {
        let plan = &first.iter().find(|r| r.plan.name == node).unwrap().plan;
        let key = &mergesmith::nodes::images::image_keys(&plan.preimage)[0].1;
        image::open(cache.image_path(key)).unwrap().to_rgb8()
    };
    let cell = cell_image("sweep.0.look");
    assert_eq!((cell.width(), cell.height()), (64, 48));
    assert!(grid.width() > 2 * 64 && grid.height() > 2 * 48);
    // The bottom-right cell of the grid is the image of x = 0.75, y = 4 (cell 3).
    let last = cell_image("sweep.3.look");
    let (gx, gy) = (grid.width() - 64, grid.height() - 48);
    for (x, y) in [(0, 0), (63, 47), (20, 30)] {
        assert_eq!(grid.get_pixel(gx + x, gy + y), last.get_pixel(x, y));
    }
    // An image leads back to its merge and merge ID (`log --merges --image`): the key in
    // its PNG info, the generate node that made it, the merge it read.
    cache.append_log(&path, &first).unwrap();
    let plan = &first
        .iter()
        .find(|r| r.plan.name == "sweep.3.look")
        .unwrap()
        .plan;
    let key = &mergesmith::nodes::images::image_keys(&plan.preimage)[0].1;
    let png = std::fs::read(cache.image_path(key)).unwrap();
    let text = mergesmith::gen::png::read_text(&png).unwrap();
    let carried = &text.iter().find(|(k, _)| k == "mergesmith").unwrap().1;
    let m = cache.merge_of_image(carried).expect("the cell's merge");
    assert_eq!(m.merge["alpha"], 0.75);
    assert!(cache
        .merges()
        .iter()
        .any(|r| r.id == m.id && r.key == m.key));
    assert!(cache.merge_of_image("no such image").is_none());
    // Again: the grid is a hit, and no cell is even planned to run.
    let again = build::build(&r, &cache, &["sweep".into()], &BuildOptions::default()).unwrap();
    assert!(again
        .iter()
        .all(|r| !matches!(r.plan.status, Status::Miss(_))));
    assert_eq!(
        again
            .iter()
            .find(|r| r.plan.name == "sweep")
            .unwrap()
            .plan
            .status,
        Status::Hit
    );
}

#[test]
fn the_effective_checker_adds_a_difference_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::small_models(d, &["a", "b", "c"]);
    let path = d.join("r.yaml");
    std::fs::write(
        &path,
        format!("{}      x: {{ type: effective, values: \"OUT00-OUT11:, IN04:attn\" }}\n      y: {{ type: alpha, values: [0.9] }}\n    to: grids\n", BASE.replace("    alpha: 0.5\n", "    alpha: 0.5\n    cache: memory\n")),
    )
    .unwrap();
    let r = recipe::load(&path).unwrap();
    build::build(
        &r,
        &Cache::new(&d.join("cache")),
        &[],
        &BuildOptions::default(),
    )
    .unwrap();
    let grid = image::open(d.join("grids/sweep.png")).unwrap().to_rgb8();
    // Three columns (baseline and two elements) of 64 px, two rows (images, differences).
    assert!(
        grid.width() >= 3 * 64 && grid.height() >= 2 * 48,
        "{:?}",
        grid.dimensions()
    );
    // The baseline's difference with itself is all white; the bottom-left cell is white.
    let (x0, y0) = (grid.width() - 3 * 64, grid.height() - 48);
    assert!((0..64).all(|x| (0..48).all(|y| grid.get_pixel(x0 + x, y0 + y).0 == [255, 255, 255])));
    // Changing every OUT block's weights changes the picture somewhere by more than the
    // threshold: some channel of the inverted difference is under 255 - 20.
    let (x1, y1) = (grid.width() - 2 * 64, grid.height() - 48);
    assert!((0..64).any(|x| (0..48).any(|y| grid
        .get_pixel(x1 + x, y1 + y)
        .0
        .iter()
        .any(|c| *c < 235))));
}

#[test]
fn keep_going_builds_the_other_cells_and_greys_the_failed_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::small_models(d, &["a", "b"]);
    // Model C is an SDXL file: merging it with SD1 models fails.
    crate::common::synth(
        d,
        "c.safetensors",
        &crate::common::tiny(Family::builtin("sdxl"), 3),
    );
    let path = d.join("r.yaml");
    let text = BASE.replace("    alpha: 0.5\n", "    alpha: 0.5\n    cache: memory\n");
    std::fs::write(
        &path,
        format!("{text}      x: {{ type: model_b, values: \"b, c, a\" }}\n    to: grids\n"),
    )
    .unwrap();
    let r = recipe::load(&path).unwrap();
    let cache = Cache::new(&d.join("cache"));
    // Without --keep-going the plan refuses the whole build.
    let err = build::build(&r, &cache, &[], &BuildOptions::default()).unwrap_err();
    assert!(err.to_string().contains("sweep.1.blend"), "{err}");
    let opts = BuildOptions {
        keep_going: true,
        ..BuildOptions::default()
    };
    let reports = build::build(&r, &cache, &[], &opts).unwrap();
    let report = |n: &str| reports.iter().find(|r| r.plan.name == n).unwrap();
    assert!(report("sweep.1.blend").error.is_some());
    assert!(report("sweep.1.look")
        .error
        .as_deref()
        .unwrap()
        .contains("its input `sweep.1.blend` failed"));
    assert!(report("sweep.0.look").error.is_none() && report("sweep.2.look").error.is_none());
    assert!(report("sweep")
        .error
        .as_deref()
        .unwrap()
        .contains("1 cell(s) failed"));
    // The grid is written with a grey middle cell, but not stored as the complete grid.
    let grid = image::open(d.join("grids/sweep.png")).unwrap().to_rgb8();
    let (x, y) = (grid.width() - 2 * 64 + 32, grid.height() - 10);
    assert_eq!(grid.get_pixel(x, y).0, [200, 200, 200]);
    let again = build::plan(&r, &cache, &["sweep.0.look".into()]).unwrap();
    assert_eq!(
        again
            .iter()
            .find(|p| p.name == "sweep.0.look")
            .unwrap()
            .status,
        Status::Hit
    );
    // The report shows the failure in the cell's slot.
    let site = mergesmith::report::write(&r, &cache, &reports, &d.join("site")).unwrap();
    let page = std::fs::read_to_string(d.join("site/sweep-sweep.html")).unwrap();
    assert!(page.contains("failed: sweep.1.look"), "{page}");
    assert_eq!(site.pages.len(), 2);
}

#[test]
fn cells_switch_modes_as_supermerger_plots_do() {
    use mergesmith::merge::Mode;
    // A beta axis on weight_sum runs as sum twice, with A as C (SuperMerger's substitution).
    let r = parse("      x: { type: beta, values: \"0.1, 0.3\" }\n").unwrap();
    let (spec, inputs, _) = cell(&r, 1);
    assert_eq!(spec.mode, Mode::SumTwice);
    assert_eq!(spec.beta, Some(Ratio::Scalar(0.3)));
    assert_eq!(inputs.len(), 3);
    assert_eq!(inputs[2].name(), inputs[0].name());
    assert!(
        grids(&r)[0].header.contains("run as sum Twice"),
        "{}",
        grids(&r)[0].header
    );
    // A calcmode axis: trainDifference / extract cells run as add difference (C = A); the
    // normal cell stays a weight sum.
    let r = parse("      x: { type: calcmode, values: \"normal, trainDifference\" }\n").unwrap();
    let (spec, inputs, _) = cell(&r, 0);
    assert_eq!((spec.mode, inputs.len()), (Mode::WeightSum, 2));
    let (spec, inputs, _) = cell(&r, 1);
    assert_eq!(
        (spec.mode, spec.calcmode, inputs.len()),
        (Mode::AddDifference, CalcMode::TrainDifference, 3)
    );
    assert!(grids(&r)[0].header.contains("run as Add difference"));
}

#[test]
fn add_include_and_exclude_extend_the_merges_list() {
    let text = BASE.replace(
        "    alpha: 0.5\n",
        "    alpha: 0.5\n    exclude: { blocks: \"IN01\", elements: attn2 }\n",
    );
    let r = recipe::parse(
        Path::new("r.yaml"),
        &format!("{text}      x: {{ type: add_include, values: \"OUT03 OUT04, M00\" }}\n      y: {{ type: add_exclude, values: [\"NOT IN05\"] }}\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let f = |i| cell(&r, i).0.filter.clone().unwrap();
    // The later axis wins the mode (SuperMerger: the axis type sets Include/Exclude); the
    // blocks accumulate onto the merge's own list, its elements stay.
    let (f0, f1) = (f(0), f(1));
    assert_eq!(f0.mode, mergesmith::merge::FilterMode::Exclude);
    assert_eq!(f0.blocks, "IN01 OUT03 OUT04 NOT IN05");
    assert_eq!(f0.elements, "attn2");
    assert_eq!(f1.blocks, "IN01 M00 NOT IN05");
}

#[test]
fn prompt3_and_random_seeds() {
    // prompt3: the whole text is one prompt, `|` and newlines included.
    let r =
        parse("      x: { type: prompt3, values: \"a cat\\nin a hat, red | blue\" }\n").unwrap();
    assert_eq!(grids(&r)[0].cells.len(), 1);
    assert_eq!(cell(&r, 0).2.prompt, "a cat\nin a hat, red | blue");
    // seed -1: a drawn seed per -1, the same on every parse, another for another axis seed.
    let seeds = |axis: &str| {
        let r = parse(axis).unwrap();
        (0..3).map(|i| cell(&r, i).2.seed).collect::<Vec<u64>>()
    };
    let a = seeds("      x: { type: seed, values: \"-1, 5, -1\" }\n");
    assert_eq!(a[1], 5);
    assert!(a[0] != a[2] && a[0] <= u32::MAX as u64 && a[0] != u64::MAX);
    assert_eq!(a, seeds("      x: { type: seed, values: [-1, 5, -1] }\n"));
    assert_ne!(
        a[0],
        seeds("      x: { type: seed, values: \"-1, 5, -1\", seed: 1 }\n")[0]
    );
}

#[test]
fn pinpoint_element_ext_names_blocks_from_the_extended_list() {
    // SuperMerger's "pinpoint element ext": the items take the alpha axis' value, their
    // blocks named from SDXL's extended list.
    let r = parse(
        "      x: { type: pinpoint_element_ext, values: \"MID103:attn1, IN410:\" }\n      y: { type: alpha, values: [0.8] }\n",
    )
    .unwrap();
    let (spec, _, _) = cell(&r, 0);
    assert_eq!(spec.elemental.as_deref(), Some("MID103:attn1:0.8"));
    assert_eq!(spec.block_list.as_deref(), Some("extended"));
    assert_eq!(spec.alpha, Ratio::Scalar(0.5), "the merge's alpha stays");
    assert_eq!(
        grids(&r)[0].x_labels[0],
        "pinpoint_element_ext = MID103:attn1"
    );

    // The cell's merge on SDXL files changes the keys of that fine block only.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let xl = Family::builtin("sdxl");
    let a = crate::common::synth(d, "a.safetensors", &crate::common::tiny(xl, 1));
    let b = crate::common::synth(d, "b.safetensors", &crate::common::tiny(xl, 2));
    let out = d.join("out.safetensors");
    let mut s = spec.clone();
    s.alpha = Ratio::Scalar(0.0);
    mergesmith::merge::merge_files(
        &mergesmith::merge::MergeFiles {
            a: &a,
            b: &b,
            c: None,
        },
        &s,
        &out,
        &mergesmith::store::memo(&d.join("cache")),
        &mergesmith::merge::RunOptions::default(),
    )
    .unwrap();
    let (ca, co) = (
        mergesmith::checkpoint::Checkpoint::open(&a).unwrap(),
        mergesmith::checkpoint::Checkpoint::open(&out).unwrap(),
    );
    let mut changed: Vec<String> = co
        .tensors()
        .iter()
        .filter(|t| ca.get(&t.name).is_some_and(|u| ca.data(u) != co.data(t)))
        .map(|t| t.name.clone())
        .collect();
    changed.sort();
    assert!(!changed.is_empty());
    for k in &changed {
        assert!(
            k.contains("middle_block.1.transformer_blocks.3.attn1."),
            "{k} changed"
        );
    }
    // A merge reading another block list cannot take extended names.
    let text = format!(
        "{}      x: {{ type: pinpoint_element_ext, values: \"MID103:attn1\" }}\n      y: {{ type: alpha, values: [0.8] }}\n",
        BASE.replace("alpha: 0.5\n", "alpha: 0.5\n    block_list: supermerger\n")
    );
    let e = recipe::parse(Path::new("r.yaml"), &text)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pinpoint_element_ext") && e.contains("`supermerger`"),
        "{e}"
    );
}

#[test]
fn pinpoint_blocks_all_names_the_blocks_of_the_merged_family() {
    // SDXL files: ALL is BASE-M00 and OUT00-OUT08, SDXL's blocks (SuperMerger writes SD's).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let xl = Family::builtin("sdxl");
    for (name, seed) in [("a", 1), ("b", 2)] {
        crate::common::synth(
            d,
            &format!("{name}.safetensors"),
            &crate::common::tiny(xl, seed),
        );
    }
    let text = format!(
        "{BASE}      x: {{ type: pinpoint_blocks, values: ALL }}\n      y: {{ type: alpha, values: [1] }}\n"
    );
    let r = recipe::parse(&d.join("r.yaml"), &text).unwrap();
    let g = grids(&r);
    assert_eq!((g.len(), g[0].cells.len(), g[1].cells.len()), (2, 11, 9));
    assert_eq!(g[0].x_labels[10], "M00");
    assert_eq!(g[1].x_labels.last().map(String::as_str), Some("OUT08"));
    // A cell's vector reads as SDXL's: OUT08 set, the rest at the merge's 0.5.
    let (spec, _, _) = cell(&r, 11 + 8);
    let Ratio::Blocks(v) = &spec.alpha else {
        panic!("{:?}", spec.alpha)
    };
    let b = mergesmith::merge::weights::BlockRatio::resolve_in(
        &Ratio::Blocks(v.clone()),
        xl,
        "alpha",
        None,
    )
    .unwrap();
    let mergesmith::merge::weights::BlockRatio::Blocks(w) = b else {
        panic!("{b:?}")
    };
    assert_eq!(w.len(), 20);
    assert_eq!(w[19], 1.0);
    assert!(w[..19].iter().all(|x| *x == 0.5), "{w:?}");
}

#[test]
fn a_model_axis_generates_from_each_checkpoint() {
    // SuperMerger's "merge ID" axis: merges imported one node per ID, compared side by side.
    let text = BASE.replace(
        "  look:\n",
        "  merge_3: { merge: add_difference, a: a, b: b, c: c, alpha: 0.3 }\n  merge_7: { merge: weight_sum, a: b, b: c, alpha: 0.7 }\n  look:\n",
    ) + "      x: { type: model, values: \"merge_3, merge_7, a\" }\n";
    let r = recipe::parse(Path::new("r.yaml"), &text).unwrap();
    let g = grids(&r);
    assert_eq!(g[0].x_labels, ["model = merge_3", "merge_7", "a"]);
    let model = |i: usize| match &r.nodes[&format!("sweep.{i}.look")] {
        Node::Generate(GenerateNode { model, .. }) => model.clone(),
        _ => panic!("no cell {i}"),
    };
    assert_eq!(model(0), Input::Node("merge_3".into()));
    assert_eq!(model(1), Input::Node("merge_7".into()));
    assert_eq!(model(2), Input::Model("a".into()));
    // The merges are built before the cells that read them.
    let at = |n: &str| r.order.iter().position(|o| o == n).unwrap();
    assert!(at("merge_7") < at("sweep.1.look"));
    // The same as a path axis; a LoRA node is no checkpoint.
    let r2 = recipe::parse(
        Path::new("r.yaml"),
        &text.replace("type: model,", "path: look.model,"),
    )
    .unwrap();
    assert_eq!(grids(&r2)[0].cells.len(), 3);
    let e = recipe::parse(
        Path::new("r.yaml"),
        &text.replace("merge_7, a", "merge_7, nope"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`nope` is not a model or node"), "{e}");
}
