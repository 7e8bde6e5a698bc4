//! Recipes: parsing, errors that point, and incremental builds on real (tiny) files.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use mergesmith::arch::Family;
use mergesmith::build::{self, Cache, Status};
use mergesmith::merge::RunOptions;
use mergesmith::recipe;

const RECIPE: &str = "version: 1
models:
  base:  { path: models/base.safetensors }
  tuned: { path: models/tuned.safetensors }
  other: { path: models/other.safetensors }
nodes:
  blend:
    merge: weight_sum
    a: base
    b: tuned
    alpha: ALPHA
  detail:
    merge: add_difference
    a: blend
    b: other
    c: base
    alpha: 0.3
    calcmode: trainDifference
  release:
    save: detail
    to: out/result.safetensors
";

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("models");
        std::fs::create_dir_all(&m).unwrap();
        let base = synth(&m, "base.safetensors", &tiny(Family::Sd1, 1));
        for (name, seed) in [("tuned.safetensors", 2), ("other.safetensors", 3)] {
            let mut o = tiny(Family::Sd1, seed);
            o.perturb = Some(mergesmith::synth::Perturb {
                base: base.clone(),
                strength: 0.3,
                rank: 2,
            });
            synth(&m, name, &o);
        }
        Project { dir }
    }

    fn recipe(&self, alpha: &str) -> PathBuf {
        self.write(&RECIPE.replace("ALPHA", alpha))
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("recipe.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cache(&self) -> Cache {
        Cache::new(&self.dir.path().join("cache"))
    }

    fn plan(&self, path: &Path) -> Vec<build::NodePlan> {
        build::plan(&recipe::load(path).unwrap(), &self.cache(), &[]).unwrap()
    }

    fn build(&self, path: &Path) -> Vec<build::NodeReport> {
        build::build(
            &recipe::load(path).unwrap(),
            &self.cache(),
            &[],
            &RunOptions::default(),
        )
        .unwrap()
    }

    fn output(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("out/result.safetensors")).unwrap()
    }
}

fn built(r: &[build::NodeReport]) -> Vec<&str> {
    r.iter()
        .filter(|r| matches!(r.plan.status, Status::Miss(_)))
        .map(|r| r.plan.name.as_str())
        .collect()
}

fn reasons(plan: &[build::NodePlan], node: &str) -> Vec<String> {
    match &plan.iter().find(|p| p.name == node).unwrap().status {
        Status::Miss(r) => r.clone(),
        Status::Hit => vec![],
    }
}

#[test]
fn rebuilds_only_what_changed() {
    let p = Project::new();
    let r = p.recipe("0.3");
    assert_eq!(built(&p.build(&r)), vec!["blend", "detail", "release"]);
    let first = p.output();
    // Nothing changed: every node is a hit and nothing runs.
    assert!(p.plan(&r).iter().all(|n| n.status == Status::Hit));
    assert!(built(&p.build(&r)).is_empty());
    assert_eq!(p.output(), first);

    // One ratio changed: that node and its dependents rebuild, with reasons.
    let r = p.recipe("0.35");
    let plan = p.plan(&r);
    assert_eq!(reasons(&plan, "blend"), vec!["merge.alpha: 0.3 -> 0.35"]);
    assert_eq!(reasons(&plan, "detail"), vec!["input node `blend` changed"]);
    assert_eq!(
        reasons(&plan, "release"),
        vec!["input node `detail` changed"]
    );
    assert_eq!(built(&p.build(&r)), vec!["blend", "detail", "release"]);
    assert_ne!(p.output(), first);

    // Back to 0.3: the earlier results are still cached, only the save runs again.
    let r = p.recipe("0.3");
    assert_eq!(built(&p.build(&r)), vec!["release"]);
    assert_eq!(p.output(), first, "same recipe and inputs, same bytes");
}

#[test]
fn one_block_weight_change_is_explained_by_block() {
    let p = Project::new();
    let mut v = vec!["0.5"; 26];
    let r = p.recipe(&format!("[{}]", v.join(", ")));
    p.build(&r);
    v[5] = "0.9";
    let r = p.recipe(&format!("[{}]", v.join(", ")));
    assert_eq!(
        reasons(&p.plan(&r), "blend"),
        vec!["merge.alpha IN04: 0.5 -> 0.9"]
    );
    // Only IN04's 38 blended tensors are computed again, in `blend` and downstream in `detail`;
    // every other tensor is copied from the first build.
    let reports = p.build(&r);
    let counts = |n: &str| {
        let r = reports.iter().find(|r| r.plan.name == n).unwrap();
        (r.computed.unwrap(), r.reused.unwrap())
    };
    let (computed, reused) = counts("blend");
    assert_eq!(computed, 38);
    assert!(reused > 1000, "{reused}");
    assert_eq!(counts("detail").0, 38);
    // And the result equals a clean build of the new recipe.
    let incremental = p.output();
    let fresh = Project::new();
    let r2 = fresh.recipe(&format!("[{}]", v.join(", ")));
    let first = fresh.build(&r2);
    assert_eq!(
        first
            .iter()
            .find(|r| r.plan.name == "blend")
            .unwrap()
            .reused,
        Some(0)
    );
    assert!(
        fresh.output() == incremental,
        "incremental and clean builds give the same bytes"
    );
}

#[test]
fn inputs_are_keyed_by_content() {
    let p = Project::new();
    let r = p.recipe("0.3");
    p.build(&r);
    // Renaming a file (and the recipe's path to it) changes no key.
    let m = p.dir.path().join("models");
    std::fs::rename(m.join("tuned.safetensors"), m.join("tuned-v1.safetensors")).unwrap();
    let r = p.write(
        &RECIPE
            .replace("ALPHA", "0.3")
            .replace("models/tuned.safetensors", "models/tuned-v1.safetensors"),
    );
    assert!(p.plan(&r).iter().all(|n| n.status == Status::Hit));
    // New bytes in `other`: exactly its dependents rebuild.
    let mut o = tiny(Family::Sd1, 9);
    o.perturb = Some(mergesmith::synth::Perturb {
        base: m.join("base.safetensors"),
        strength: 0.3,
        rank: 2,
    });
    mergesmith::synth::synthesize(&o, &m.join("other.safetensors"), true, false).unwrap();
    let plan = p.plan(&r);
    assert_eq!(plan[0].status, Status::Hit, "blend does not read `other`");
    assert_eq!(
        reasons(&plan, "detail"),
        vec!["input model `other` changed content"]
    );
    assert_eq!(built(&p.build(&r)), vec!["detail", "release"]);
}

#[test]
fn never_replaces_a_foreign_file() {
    let p = Project::new();
    let r = p.recipe("0.3");
    let out = p.dir.path().join("out/result.safetensors");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, b"someone else's file").unwrap();
    let err = build::build(
        &recipe::load(&r).unwrap(),
        &p.cache(),
        &[],
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("overwrite: true"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"someone else's file");
    let r = p.write(&RECIPE.replace("ALPHA", "0.3").replace(
        "to: out/result.safetensors",
        "to: out/result.safetensors\n    overwrite: true",
    ));
    p.build(&r);
    assert_ne!(std::fs::read(&out).unwrap(), b"someone else's file");
}

#[test]
fn concurrent_builds_share_one_cache() {
    let p = Project::new();
    let r = p.recipe("0.45");
    let results: Vec<_> = std::thread::scope(|s| {
        let h: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    build::build(
                        &recipe::load(&r).unwrap(),
                        &p.cache(),
                        &[],
                        &RunOptions::default(),
                    )
                })
            })
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for res in &results {
        assert!(res.is_ok(), "{res:?}");
    }
    let out = p.output();
    assert!(built(&p.build(&r)).is_empty());
    assert_eq!(p.output(), out);
}

#[test]
fn targets_build_only_what_they_need() {
    let p = Project::new();
    let r = p.recipe("0.3");
    let rec = recipe::load(&r).unwrap();
    let reports = build::build(
        &rec,
        &p.cache(),
        &["blend".to_string()],
        &RunOptions::default(),
    )
    .unwrap();
    assert_eq!(built(&reports), vec!["blend"]);
    let err = build::build(
        &rec,
        &p.cache(),
        &["blnd".to_string()],
        &RunOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("did you mean `blend`"), "{err}");
}

fn errors(text: &str) -> recipe::RecipeErrors {
    recipe::parse(Path::new("recipe.yaml"), text).unwrap_err()
}

#[test]
fn errors_point_at_the_recipe() {
    let e = errors("version: 1\nmodels:\n  base: { path: a.safetensors }\n  tuned: { path: b.safetensors }\nnodes:\n  blend:\n    merge: weight_sum\n    a: base\n    b: tunned\n    alpha: 0.3\n");
    assert_eq!(
        e.render(),
        "  × `tunned` is not a model or node of this recipe
    ╭─[recipe.yaml:9:8]
  8 │     a: base
  9 │     b: tunned
    ·        ───┬──
    ·           ╰── here
 10 │     alpha: 0.3
    ╰────
  help: did you mean `tuned`?
"
    );
    assert_eq!(
        e.to_string(),
        "recipe.yaml:9:8: `tunned` is not a model or node of this recipe (did you mean `tuned`?)"
    );

    let e = errors(
        "version: 1\nnodes:\n  x:\n    merge: weight_sum\n    a: x\n    b: x\n    alpah: 0.3\n",
    );
    assert_eq!(e.errors.len(), 1);
    assert_eq!((e.errors[0].line, e.errors[0].column), (7, 5));
    assert!(
        e.errors[0].message.starts_with("unknown field `alpah`"),
        "{}",
        e.errors[0].message
    );
    assert_eq!(e.errors[0].help.as_deref(), Some("did you mean `alpha`?"));
}

#[test]
fn all_errors_are_reported_at_once() {
    let e = errors(
        "version: 2
models:
  base: { path: a.safetensors }
nodes:
  m:
    merge: weight_sum
    a: base
    b: base
    alpha: GRAD_X
  loop1:
    merge: weight_sum
    a: loop2
    b: base
    alpha: 0.5
  loop2:
    merge: weight_sum
    a: loop1
    b: base
    alpha: 0.5
    calcmode: trainDifference
  out:
    save: m
",
    );
    let text = e.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].starts_with("recipe.yaml:1:10: unsupported recipe version 2"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("recipe.yaml:9:12: `GRAD_X` is neither"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("recipe.yaml:11:5: nodes form a cycle: loop1 -> loop2 -> loop1"),
        "{text}"
    );
    assert!(
        lines[3].starts_with(
            "recipe.yaml:20:15: calcmode trainDifference applies to Add difference only"
        ),
        "{text}"
    );
    assert!(
        lines[4].starts_with("recipe.yaml:22:5: save node `out` needs `to: PATH`"),
        "{text}"
    );
}

#[test]
fn schema_file_is_up_to_date() {
    let on_disk = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/recipe.v1.json"
    ))
    .unwrap();
    assert!(
        on_disk == recipe::schema_json(),
        "schema/recipe.v1.json is stale: run `cargo run -- schema > schema/recipe.v1.json`"
    );
}

#[test]
fn example_recipes_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            recipe::load(&path).unwrap_or_else(|e| panic!("{}", e.render()));
            n += 1;
        }
    }
    assert!(n >= 1);
}

#[test]
fn gc_clean_and_dag() {
    let p = Project::new();
    let r = p.recipe("0.3");
    p.build(&r);
    let cache = p.cache();
    let stats = cache.stats();
    assert_eq!(stats.objects, 2);
    // A budget that fits one object keeps the most recently used one.
    let one = std::fs::metadata(cache.object(&p.plan(&r)[1].key))
        .unwrap()
        .len();
    let (removed, _) = cache.gc(one).unwrap();
    assert_eq!((removed, cache.stats().objects), (1, 1));
    assert_eq!(
        reasons(&p.plan(&r), "blend"),
        vec!["its result is no longer in the cache"]
    );
    // `clean` forgets results and build history alike.
    cache.clean().unwrap();
    assert_eq!(cache.stats().objects, 0);
    assert_eq!(reasons(&p.plan(&r), "blend"), vec!["never built"]);
    // After cleaning, a build recomputes everything and gives the same bytes.
    let before = p.output();
    p.build(&r);
    assert_eq!(p.output(), before);

    let dag = recipe::load(&r).unwrap().dag(recipe::DagFormat::Mermaid);
    assert!(dag.starts_with("graph LR\n"));
    for edge in [
        "base --> blend",
        "tuned --> blend",
        "blend --> detail",
        "detail --> release",
    ] {
        assert!(dag.contains(edge), "{edge} in {dag}");
    }
    let dot = recipe::load(&r).unwrap().dag(recipe::DagFormat::Dot);
    assert!(dot.contains("\"blend\" -> \"detail\";"));
}

#[test]
fn a_build_killed_mid_write_leaves_nothing_and_resumes() {
    let p = Project::new();
    let r = p.recipe("0.3");
    let bin = env!("CARGO_BIN_EXE_mergesmith");
    let cache = p.dir.path().join("cache");
    let status = std::process::Command::new(bin)
        .args([
            "build",
            r.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
            "--json",
        ])
        .env("MERGESMITH_TEST_ABORT_AFTER_TENSORS", "100")
        .current_dir(p.dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the build was killed");
    // No object and no output exist under their final names.
    assert_eq!(p.cache().stats().objects, 0);
    assert!(!p.dir.path().join("out/result.safetensors").exists());
    // The next build completes and matches a clean build in a fresh project.
    let reports = p.build(&r);
    assert_eq!(built(&reports), vec!["blend", "detail", "release"]);
    let fresh = Project::new();
    fresh.build(&fresh.recipe("0.3"));
    assert!(fresh.output() == p.output());
}

#[test]
fn lockfile_and_verify() {
    let p = Project::new();
    let r = p.recipe("0.3");
    let bin = env!("CARGO_BIN_EXE_mergesmith");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .current_dir(p.dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["build", r.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lock = p.dir.path().join("recipe.lock");
    let text = std::fs::read_to_string(&lock).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["inputs"]["base"]["path"], "models/base.safetensors");
    let sha = mergesmith::hashing::hash_file(&p.dir.path().join("out/result.safetensors"))
        .unwrap()
        .sha256;
    assert_eq!(json["outputs"]["release"]["sha256"], sha);

    let ok = run(&["verify", r.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // Someone edits the output: verify names it and fails with exit code 1.
    let mut bytes = p.output();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(p.dir.path().join("out/result.safetensors"), bytes).unwrap();
    let bad = run(&["verify", r.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout)
        .contains("release (out/result.safetensors): output differs"));
}

#[test]
fn builds_are_logged_with_increasing_ids() {
    let p = Project::new();
    let cache = p.cache();
    let r = p.recipe("0.3");
    let rec = recipe::load(&r).unwrap();
    let first = build::build(&rec, &cache, &[], &RunOptions::default()).unwrap();
    assert_eq!(cache.append_log(&r, &first).unwrap(), 1);
    let second = build::build(&rec, &cache, &[], &RunOptions::default()).unwrap();
    assert_eq!(cache.append_log(&r, &second).unwrap(), 2);
    let log = cache.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].built.len(), 3);
    assert_eq!((log[1].built.len(), log[1].cached), (0, 3));
}

#[test]
fn a_merged_model_turns_back_into_its_recipe() {
    let p = Project::new();
    let d = p.dir.path();
    let bin = env!("CARGO_BIN_EXE_mergesmith");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin)
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    run(&[
        "merge",
        "-a",
        "models/base.safetensors",
        "-b",
        "models/tuned.safetensors",
        "--mbw",
        "GRAD_V",
        "--elemental",
        "OUT06:attn:0.9",
        "--exclude",
        "--blocks",
        "IN01 VAE",
        "--dtype",
        "bf16",
        "-o",
        "m.safetensors",
    ]);
    run(&[
        "recipe",
        "from-model",
        "m.safetensors",
        "-o",
        "models/back.yaml",
    ]);
    run(&["build", "models/back.yaml"]);
    // Same inputs, same merge: the rebuilt file is byte-identical to the original.
    let original = std::fs::read(d.join("m.safetensors")).unwrap();
    let rebuilt = std::fs::read(d.join("models/m.rebuilt.safetensors")).unwrap();
    assert!(original == rebuilt);
}

#[test]
fn supermerger_metadata_imports() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sm.safetensors");
    let md = BTreeMap::from([
        (
            "sd_merge_recipe".to_string(),
            r#"{"type":"sd-webui-supermerger","mode":"Add difference","calcmode":"trainDifference","mbw":false,"base_alpha":0.4,"base_beta":0.25,"model_a":"aaa","model_b":"bbb","model_c":"ccc","weights_alpha_orig":null,"elemental_merge":["OUT03::0.5"]}"#.to_string(),
        ),
        ("sd_merge_models".to_string(), r#"{"aaa":{"name":"anime.safetensors"},"bbb":{"name":"real.safetensors"}}"#.to_string()),
    ]);
    let spec = mergesmith::checkpoint::writer::TensorSpec {
        name: "x".into(),
        dtype: mergesmith::dtype::DType::U8,
        shape: vec![1],
    };
    let w =
        mergesmith::checkpoint::writer::SafetensorsWriter::create(&path, vec![spec], &md, false)
            .unwrap();
    w.write("x", &[0]).unwrap();
    w.finish().unwrap();
    let yaml = recipe::import::from_model(&path).unwrap();
    let r = recipe::parse(&dir.path().join("r.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{}\n{yaml}", e.render()));
    assert!(
        yaml.contains("path: \"anime.safetensors\"")
            && yaml.contains("path: \"model_c.safetensors\""),
        "{yaml}"
    );
    let recipe::Node::Merge { spec, inputs, .. } = &r.nodes["merged"] else {
        panic!()
    };
    assert_eq!(spec.mode, mergesmith::merge::Mode::AddDifference);
    assert_eq!(spec.calcmode, mergesmith::merge::CalcMode::TrainDifference);
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Scalar(0.4));
    assert_eq!(spec.elemental.as_deref(), Some("OUT03::0.5"));
    assert_eq!(inputs.len(), 3);
}

#[test]
fn supermerger_history_imports() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("mergehistory.csv");
    let w26 = vec!["0.5"; 26].join(",");
    let text = format!(
        "\"ID\",\"time\",\"name\",\"weights alpha\",\"weights beta\",\"model A\",\"model B\",\"model C\",\"alpha\",\"beta\",\"mode\",\"use MBW\",\"plus lora\",\"custum name\",\"save setting\",\"use ID\"\n\
         1,2024.01.02 03.04.05,\"anime x 0.5 + real x 0.5\",\"{w26}\",,aaaaaaaaaa,bbbbbbbbbb,,0.5,0.25,Weight sum:A*(1-alpha)+B*alpha,True,,\"['safetensors']\",[],,normal,-1,,0.3,Off,[],\n\
         2,2024.01.02 03.05.00,\"blend\",,,aaaaaaaaaa,bbbbbbbbbb,cccccccccc,0.7,0.25,Add difference:A+(B-C)*alpha,False,,[],[],\"OUT03::0.5\",trainDifference,-1,\"1,0,0,0,0,0,0,0\",0.3,Exclude,\"['IN01', 'IN02']\",attn2\n"
    );
    std::fs::write(&csv, text).unwrap();
    let yaml = recipe::import::from_supermerger_history(&csv, None).unwrap();
    let r = recipe::parse(&dir.path().join("r.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{}\n{yaml}", e.render()));
    assert_eq!(r.models.len(), 3);
    assert!(
        yaml.contains(
            "model_aaaaaaaaaa: { path: \"aaaaaaaaaa.safetensors\", autov2: \"aaaaaaaaaa\" }"
        ),
        "{yaml}"
    );
    let recipe::Node::Merge { spec, .. } = &r.nodes["merge_1"] else {
        panic!()
    };
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Blocks(vec![0.5; 26]));
    let recipe::Node::Merge { spec, inputs, .. } = &r.nodes["merge_2"] else {
        panic!()
    };
    assert_eq!(
        (spec.mode, spec.calcmode),
        (
            mergesmith::merge::Mode::AddDifference,
            mergesmith::merge::CalcMode::TrainDifference
        )
    );
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Scalar(0.7));
    assert_eq!(spec.adjust, Some([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
    let f = spec.filter.as_ref().unwrap();
    assert_eq!(
        (f.blocks.as_str(), f.elements.as_str()),
        ("IN01 IN02", "attn2")
    );
    assert_eq!(inputs.len(), 3);
    // One ID only.
    let one = recipe::import::from_supermerger_history(&csv, Some(2)).unwrap();
    assert!(one.contains("merge_2") && !one.contains("merge_1"));
    assert!(recipe::import::from_supermerger_history(&csv, Some(9)).is_err());
}
