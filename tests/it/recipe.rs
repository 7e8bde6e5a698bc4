//! Recipes: parsing, errors that point, and incremental builds on real (tiny) files.

use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::build::BuildOptions;
use mergesmith::build::{self, Status};
use mergesmith::nodes::merge::MergeNode;
use mergesmith::nodes::Node;
use mergesmith::recipe;
use mergesmith::store::Cache;

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
        let base = synth(&m, "base.safetensors", &tiny(Family::builtin("sd1"), 1));
        for (name, seed) in [("tuned.safetensors", 2), ("other.safetensors", 3)] {
            let mut o = tiny(Family::builtin("sd1"), seed);
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
            &BuildOptions::default(),
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
        Status::Skip(why) => vec![format!("skip: {why}")],
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
        (r.stored.unwrap(), r.reused.unwrap())
    };
    let (computed, reused) = counts("blend");
    assert_eq!(computed, 38);
    assert!(reused > 1000, "{reused}");
    assert_eq!(counts("detail").0, 38);
    // The store keeps just those: `blend`'s result now reads from the first build's pack and
    // from a new pack holding IN04's 38 tensors.
    let cache = p.cache();
    let blend_key = &p.plan(&r)[0].key;
    let manifest = cache.manifest(blend_key).unwrap();
    let sizes: Vec<usize> = manifest
        .packs()
        .iter()
        .map(|pk| {
            mergesmith::checkpoint::Checkpoint::open(cache.pack_path(pk))
                .unwrap()
                .tensors()
                .len()
        })
        .collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(sizes.contains(&38), "{sizes:?}");
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
    let mut o = tiny(Family::builtin("sd1"), 9);
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
        &BuildOptions::default(),
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
                        &BuildOptions::default(),
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
        &BuildOptions::default(),
    )
    .unwrap();
    assert_eq!(built(&reports), vec!["blend"]);
    let err = build::build(
        &rec,
        &p.cache(),
        &["blnd".to_string()],
        &BuildOptions::default(),
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
    assert_eq!((stats.results, stats.packs), (2, 2));
    // A budget that fits one pack keeps the most recently used one.
    let detail = cache.manifest(&p.plan(&r)[1].key).unwrap();
    let one = std::fs::metadata(cache.pack_path(detail.file.as_deref().unwrap()))
        .unwrap()
        .len();
    let (removed, _) = cache.gc(one).unwrap();
    let stats = cache.stats();
    assert_eq!((removed, stats.results, stats.packs), (1, 1, 1));
    // `blend` is gone, but what reads it is up to date: nothing needs to run.
    assert_eq!(
        reasons(&p.plan(&r), "blend"),
        vec!["skip: not needed: what uses it is up to date"]
    );
    assert!(built(&p.build(&r)).is_empty());
    // Asked for by name, it is rebuilt and says why.
    let plan = build::plan(&recipe::load(&r).unwrap(), &cache, &["blend".into()]).unwrap();
    assert_eq!(
        reasons(&plan, "blend"),
        vec!["its result is no longer in the cache"]
    );
    // `clean` forgets results and build history alike.
    cache.clean().unwrap();
    assert_eq!(cache.stats().packs, 0);
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
    // No pack, result or output exists under its final name.
    assert_eq!((p.cache().stats().packs, p.cache().stats().results), (0, 0));
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

    // `--rebuild` reproduces the outputs from the inputs alone (the edited file is not read)
    // in a temporary cache that it removes afterwards.
    let rebuilt = run(&["verify", "--rebuild", r.to_str().unwrap()]);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stdout)
    );
    let leftovers: Vec<_> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".mergesmith-verify")
        })
        .collect();
    assert!(leftovers.is_empty());
    // A lock that records other bytes than the recipe makes is caught.
    std::fs::write(&lock, text.replace(&sha, &"0".repeat(64))).unwrap();
    let wrong = run(&["verify", "--rebuild", r.to_str().unwrap()]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("release"));
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("rebuilt output differs"));
}

const TWO_BRANCHES: &str = "version: 1
models:
  base:  { path: models/base.safetensors }
  tuned: { path: models/tuned.safetensors }
  other: { path: models/other.safetensors }
nodes:
  trial:
    merge: weight_sum
    a: base
    b: tuned
    alpha: 0.4
    CACHE
  final:
    merge: add_difference
    a: trial
    b: other
    c: base
    alpha: ALPHA
  side:
    merge: weight_sum
    a: other
    b: base
    alpha: 0.7
  release:
    save: final
    to: out/result.safetensors
    LINK
  release_side:
    save: side
    to: out/side.safetensors
";

fn two_branches(p: &Project, cache: &str, link: &str, alpha: &str) -> PathBuf {
    p.write(
        &TWO_BRANCHES
            .replace("CACHE", cache)
            .replace("LINK", link)
            .replace("ALPHA", alpha),
    )
}

fn status<'a>(plan: &'a [build::NodePlan], node: &str) -> &'a Status {
    &plan.iter().find(|p| p.name == node).unwrap().status
}

fn key_of(plan: &[build::NodePlan], node: &str) -> String {
    plan.iter().find(|p| p.name == node).unwrap().key.clone()
}

fn sorted(mut v: Vec<&str>) -> Vec<&str> {
    v.sort();
    v
}

#[test]
fn memory_nodes_never_reach_the_disk() {
    let p = Project::new();
    let r = two_branches(&p, "cache: memory", "", "0.3");
    let reports = p.build(&r);
    assert_eq!(
        sorted(built(&reports)),
        vec!["final", "release", "release_side", "side", "trial"]
    );
    // `trial` was merged in memory: the cache holds only `final` and `side`.
    let cache = p.cache();
    let plan = p.plan(&r);
    assert!(cache.manifest(&key_of(&plan, "trial")).is_none());
    let stats = cache.stats();
    assert_eq!((stats.results, stats.packs), (2, 2));
    // Keeping it on disk instead gives the same bytes and the same keys downstream.
    let disk = Project::new();
    let rd = two_branches(&disk, "", "", "0.3");
    disk.build(&rd);
    assert!(disk.output() == p.output());
    assert_eq!(key_of(&disk.plan(&rd), "final"), key_of(&plan, "final"));
    // Next build: everything it feeds is up to date, so it is not merged again.
    assert!(matches!(status(&p.plan(&r), "trial"), Status::Skip(_)));
    assert!(built(&p.build(&r)).is_empty());
    // When `final` changes, `trial` is merged again (in memory) to feed it.
    let r = two_branches(&p, "cache: memory", "", "0.4");
    assert_eq!(
        sorted(built(&p.build(&r))),
        vec!["final", "release", "trial"]
    );
    assert_eq!(p.cache().stats().results, 3);
}

#[test]
fn jobs_build_independent_nodes_together_with_the_same_bytes() {
    let p = Project::new();
    let r = two_branches(&p, "", "", "0.3");
    let opts = BuildOptions {
        jobs: 3,
        ..Default::default()
    };
    let reports = build::build(&recipe::load(&r).unwrap(), &p.cache(), &[], &opts).unwrap();
    // Reports come in plan order whatever order the nodes finished in.
    let names: Vec<&str> = reports.iter().map(|r| r.plan.name.as_str()).collect();
    assert_eq!(
        names,
        p.plan(&r)
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
    );
    let serial = Project::new();
    serial.build(&two_branches(&serial, "", "", "0.3"));
    for f in ["out/result.safetensors", "out/side.safetensors"] {
        let read = |p: &Project| std::fs::read(p.dir.path().join(f)).unwrap();
        assert!(read(&p) == read(&serial), "{f}");
    }
}

#[cfg(unix)]
#[test]
fn hardlinked_outputs_share_the_cache_file() {
    use std::os::unix::fs::MetadataExt;
    let p = Project::new();
    let r = two_branches(&p, "", "link: hardlink", "0.3");
    p.build(&r);
    let out = p.dir.path().join("out/result.safetensors");
    let cache = p.cache();
    let manifest = cache.manifest(&key_of(&p.plan(&r), "final")).unwrap();
    let pack = cache.pack_path(manifest.file.as_deref().unwrap());
    let (o, k) = (
        std::fs::metadata(&out).unwrap(),
        std::fs::metadata(&pack).unwrap(),
    );
    assert_eq!((o.ino(), o.dev()), (k.ino(), k.dev()));
    assert!(o.permissions().readonly());
    assert!(built(&p.build(&r)).is_empty());
    // After a change the result is stored in pieces: the whole file is assembled in the
    // cache once and linked; its bytes equal a plain copy from a clean build.
    let r = two_branches(&p, "", "link: hardlink", "0.35");
    p.build(&r);
    let manifest = cache.manifest(&key_of(&p.plan(&r), "final")).unwrap();
    assert!(manifest.packs().len() > 1);
    let pack = cache.pack_path(manifest.file.as_deref().unwrap());
    assert_eq!(
        std::fs::metadata(&out).unwrap().ino(),
        std::fs::metadata(&pack).unwrap().ino()
    );
    let copy = Project::new();
    copy.build(&two_branches(&copy, "", "", "0.35"));
    assert!(copy.output() == p.output());
}

#[test]
fn builds_are_logged_with_increasing_ids() {
    let p = Project::new();
    let cache = p.cache();
    let r = p.recipe("0.3");
    let rec = recipe::load(&r).unwrap();
    let first = build::build(&rec, &cache, &[], &BuildOptions::default()).unwrap();
    assert_eq!(cache.append_log(&r, &first).unwrap(), 1);
    let second = build::build(&rec, &cache, &[], &BuildOptions::default()).unwrap();
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
    let Node::Merge(MergeNode { spec, inputs, .. }) = &r.nodes["merged"] else {
        panic!()
    };
    assert_eq!(spec.mode, mergesmith::merge::Mode::AddDifference);
    assert_eq!(spec.calcmode, mergesmith::merge::CalcMode::TrainDifference);
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Scalar(0.4));
    assert_eq!(spec.elemental.as_deref(), Some("OUT03::0.5"));
    // SuperMerger's arithmetic and its (shifted) SDXL elemental names.
    assert_eq!(
        spec.numerics,
        mergesmith::merge::numerics::Numerics::Supermerger
    );
    assert!(spec.xl_elemental_shift);
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
    let Node::Merge(MergeNode { spec, .. }) = &r.nodes["merge_1"] else {
        panic!()
    };
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Blocks(vec![0.5; 26]));
    assert_eq!(
        spec.numerics,
        mergesmith::merge::numerics::Numerics::Supermerger
    );
    assert!(!spec.xl_elemental_shift, "no elemental text in row 1");
    let Node::Merge(MergeNode { spec, inputs, .. }) = &r.nodes["merge_2"] else {
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
    assert!(spec.xl_elemental_shift);
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

#[test]
fn plan_checks_merges_whose_inputs_are_not_built_yet() {
    let p = Project::new();
    synth(
        &p.dir.path().join("models"),
        "xl.safetensors",
        &tiny(Family::builtin("sdxl"), 4),
    );
    let r = p.write(
        &RECIPE
            .replace("ALPHA", "0.3")
            .replace("models/other.safetensors", "models/xl.safetensors"),
    );
    // `detail` reads `blend`, which was never built: its planned output is checked against
    // the SDXL model all the same, and nothing is built.
    let err = build::plan(&recipe::load(&r).unwrap(), &p.cache(), &[])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "node `detail`: cannot merge SD1.x (model A) with SDXL base (model B: \
         models/xl.safetensors)"
            .replace("models/", &format!("{}/models/", p.dir.path().display()))
    );
    let built = build::build(
        &recipe::load(&r).unwrap(),
        &p.cache(),
        &[],
        &BuildOptions::default(),
    );
    assert!(built.is_err());
    assert_eq!(p.cache().stats().packs, 0);
}

#[test]
fn vars_are_shared_by_nodes_and_overridden_with_set() {
    let p = Project::new();
    let text = "version: 1
models:
  base:  { path: models/base.safetensors }
  tuned: { path: models/tuned.safetensors }
  other: { path: models/other.safetensors }
vars:
  curve: GRAD_V
  strength: 0.3
nodes:
  one: { merge: weight_sum, a: base, b: tuned, alpha: $curve }
  two: { merge: add_difference, a: one, b: other, c: base, alpha: $strength }
  three: { merge: weight_sum, a: base, b: other, alpha: $curve }
";
    let r = p.write(text);
    let rec = recipe::load(&r).unwrap();
    let spelled = p.write(
        &text
            .replace("alpha: $curve", "alpha: GRAD_V")
            .replace("$strength", "0.3"),
    );
    let keys = |rec: &recipe::Recipe| -> Vec<String> {
        build::plan(rec, &p.cache(), &[])
            .unwrap()
            .into_iter()
            .map(|n| n.key)
            .collect()
    };
    // A var means exactly its value.
    assert_eq!(keys(&rec), keys(&recipe::load(&spelled).unwrap()));
    // `--set` overrides it everywhere it is used.
    let r = p.write(text);
    let set = recipe::load_with(&r, &[("strength".into(), "0.5".into())]).unwrap();
    let plan = build::plan(&set, &p.cache(), &[]).unwrap();
    let (k0, k1) = (
        keys(&rec),
        plan.iter().map(|n| n.key.clone()).collect::<Vec<_>>(),
    );
    let changed: Vec<&str> = plan
        .iter()
        .zip(k0.iter().zip(&k1))
        .filter(|(_, (a, b))| a != b)
        .map(|(n, _)| n.name.as_str())
        .collect();
    assert_eq!(changed, vec!["two"]);
    let err = recipe::load_with(&r, &[("strenght".into(), "0.5".into())]).unwrap_err();
    assert!(
        err.to_string()
            .contains("the recipe declares no var `strenght` (did you mean `strength`?)"),
        "{err}"
    );
    // An unknown var points at its use.
    let e = errors(&text.replace("alpha: $strength", "alpha: $strenght"));
    assert_eq!(
        e.to_string(),
        "recipe.yaml:11:67: no var `strenght` in this recipe (did you mean `$strength`?)"
    );
}

#[test]
fn includes_join_other_recipe_files() {
    let p = Project::new();
    let d = p.dir.path();
    std::fs::create_dir_all(d.join("shared")).unwrap();
    // Paths in an included file are relative to that file.
    std::fs::write(
        d.join("shared/models.yaml"),
        "version: 1
models:
  base:  { path: ../models/base.safetensors }
  tuned: { path: ../models/tuned.safetensors }
vars:
  curve: GRAD_V
",
    )
    .unwrap();
    let r = p.write(
        "version: 1
include: [shared/models.yaml]
nodes:
  blend: { merge: weight_sum, a: base, b: tuned, alpha: $curve }
  release: { save: blend, to: out/result.safetensors }
",
    );
    let rec = recipe::load(&r).unwrap();
    assert_eq!(
        rec.models["base"].0,
        d.join("shared/../models/base.safetensors")
    );
    assert_eq!(built(&p.build(&r)), vec!["blend", "release"]);

    // Errors in an included file point into it; names may not repeat across files; a file
    // may not include itself (directly or not).
    std::fs::write(
        d.join("shared/models.yaml"),
        "version: 1
include: [../recipe.yaml]
models:
  base:  { path: ../models/base.safetensors }
  blend: { path: ../models/tuned.safetensors }
vars:
  curve: NO_SUCH_PRESET
",
    )
    .unwrap();
    let e = recipe::load(&r).unwrap_err();
    let shared = d.join("shared/models.yaml");
    let top = d.join("recipe.yaml");
    let lines: Vec<String> = e.to_string().lines().map(String::from).collect();
    assert_eq!(
        lines,
        vec![
            format!("{}:4:43: `tuned` is not a model or node of this recipe", top.display()),
            format!(
                "{}:2:11: include cycle: recipe.yaml -> models.yaml -> recipe.yaml",
                shared.display()
            ),
            format!(
                "{}:5:10: `blend` is already declared in {}",
                shared.display(),
                top.display()
            ),
            format!(
                "{}:7:10: `NO_SUCH_PRESET` is neither a number, a comma-separated vector nor a known preset",
                shared.display()
            ),
        ],
        "{e}"
    );
}

#[test]
fn cli_set_overrides_a_var_and_rejects_bad_syntax() {
    let p = Project::new();
    let r = p.write(
        &RECIPE
            .replace("ALPHA", "$a")
            .replace("nodes:", "vars:\n  a: 0.3\nnodes:"),
    );
    let bin = env!("CARGO_BIN_EXE_mergesmith");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .current_dir(p.dir.path())
            .output()
            .unwrap()
    };
    let r = r.to_str().unwrap();
    let plain = run(&["plan", r, "--json"]);
    let set = run(&["plan", r, "--json", "--set", "a=0.6"]);
    assert!(plain.status.success() && set.status.success());
    let key = |o: &std::process::Output| -> String {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v.as_array().unwrap()[0]["key"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(key(&plain), key(&set));
    let bad = run(&["plan", r, "--set", "a"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected NAME=VALUE"));
}

#[test]
fn lora_nodes_bake_into_node_results_and_store_only_what_they_change() {
    let p = Project::new();
    let d = p.dir.path();
    let n = mergesmith::lora::synth::synthesize(
        &d.join("models/base.safetensors"),
        4,
        2,
        7,
        &d.join("models/style.safetensors"),
        false,
    )
    .unwrap();
    assert_eq!(n, 350);
    let text = "version: 1
models:
  base:  { path: models/base.safetensors }
  tuned: { path: models/tuned.safetensors }
  style: { path: models/style.safetensors }
nodes:
  blend: { merge: weight_sum, a: base, b: tuned, alpha: 0.4 }
  styled:
    lora: blend
    apply:
      - { file: style, strength: STRENGTH, blocks: OUTD }
  release: { save: styled, to: out/result.safetensors }
";
    let r = p.write(&text.replace("STRENGTH", "0.8"));
    let reports = p.build(&r);
    let styled = reports.iter().find(|r| r.plan.name == "styled").unwrap();
    let (stored, reused) = (styled.stored.unwrap(), styled.reused.unwrap());
    // Only the tensors the LoRA changes are stored; the rest are `blend`'s, referred to.
    assert!(stored > 0 && stored < 350, "{stored}");
    assert_eq!(stored + reused, 1143);
    // The same bytes as baking the saved blend with `lora apply`.
    let blend_file = d.join("blend.safetensors");
    let cache = p.cache();
    let store = mergesmith::store::Store::new(&cache);
    store
        .materialize(&key_of(&p.plan(&r), "blend"), &blend_file, false, false)
        .unwrap();
    let app = mergesmith::lora::bake::Application {
        file: mergesmith::lora::LoraFile::open(&d.join("models/style.safetensors")).unwrap(),
        strength: 0.8,
        blocks: Some(
            mergesmith::lora::blocks::BlockWeights::parse("OUTD", Family::builtin("sd1"), 0.0)
                .unwrap(),
        ),
    };
    let cli = d.join("cli.safetensors");
    mergesmith::lora::bake::bake_file(
        &blend_file,
        &[app],
        &cli,
        &Default::default(),
        false,
        false,
        false,
    )
    .unwrap();
    let tensors = |path: &Path| {
        let ck = mergesmith::checkpoint::Checkpoint::open(path).unwrap();
        ck.tensors()
            .iter()
            .map(|t| (t.name.clone(), ck.data(t).into_owned()))
            .collect::<Vec<_>>()
    };
    assert!(tensors(&cli) == tensors(&d.join("out/result.safetensors")));
    // A new strength recomputes the same tensors and nothing upstream.
    let r = p.write(&text.replace("STRENGTH", "0.5"));
    let reports = p.build(&r);
    assert_eq!(built(&reports), vec!["styled", "release"]);
    let again = reports.iter().find(|r| r.plan.name == "styled").unwrap();
    assert_eq!(again.stored, Some(stored));
    // Errors are found by `plan`, naming the node.
    let bad = p.write(&text.replace("STRENGTH", "0.8").replace("OUTD", "\"1,2,3\""));
    let err = build::plan(&recipe::load(&bad).unwrap(), &p.cache(), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("node `styled`: block weights `1,2,3`: 3 values"),
        "{err}"
    );
    let e = errors("version: 1\nmodels:\n  m: { path: a.safetensors }\nnodes:\n  x: { lora: m, apply: [{ file: y }] }\n");
    assert_eq!(
        e.to_string(),
        "recipe.yaml:5:33: `y` is not a model or node of this recipe (did you mean `m`?)"
    );
}

/// The tensors of a safetensors file, by name.
fn tensor_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let ck = mergesmith::checkpoint::Checkpoint::open(path).unwrap();
    ck.tensors()
        .iter()
        .map(|t| (t.name.clone(), ck.data(t).into_owned()))
        .collect()
}

const LORA_NODES: &str = "version: 1
models:
  base:  { path: models/base.safetensors }
  tuned: { path: models/tuned.safetensors }
  other: { path: models/other.safetensors }
  style: { path: models/style.safetensors }
nodes:
  delta:
    extract_lora: { a: tuned, b: base, rank: RANK, clamp_quantile: 1 }
  both:
    merge_loras:
      loras:
        - { file: delta, strength: 0.5 }
        - { file: style, strength: STRENGTH, blocks: OUTD }
  styled:
    lora: other
    apply: [{ file: both }]
  delta_file: { save: delta, to: out/delta.safetensors }
  both_file: { save: both, to: out/both.safetensors }
  release: { save: styled, to: out/result.safetensors }
";

#[test]
fn extract_and_merge_lora_nodes_build_what_the_cli_makes() {
    let p = Project::new();
    let d = p.dir.path();
    let models = d.join("models");
    let style = models.join("style.safetensors");
    mergesmith::lora::synth::synthesize(&models.join("base.safetensors"), 4, 2, 7, &style, false)
        .unwrap();
    let text = |rank: &str, strength: &str| {
        LORA_NODES
            .replace("RANK", rank)
            .replace("STRENGTH", strength)
    };
    let r = p.write(&text("3", "0.8"));
    let reports = p.build(&r);
    assert_eq!(
        sorted(built(&reports)),
        vec![
            "both",
            "both_file",
            "delta",
            "delta_file",
            "release",
            "styled"
        ]
    );

    // The same LoRAs and model as the CLI's extract, merge and apply.
    let cli = d.join("cli");
    std::fs::create_dir_all(&cli).unwrap();
    let opts = mergesmith::lora::extract::ExtractOptions {
        rank: 3,
        clamp_quantile: 1.0,
        ..Default::default()
    };
    let delta = cli.join("delta.safetensors");
    mergesmith::lora::extract::extract(
        &models.join("tuned.safetensors"),
        &models.join("base.safetensors"),
        &opts,
        &delta,
        false,
        false,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(&delta).unwrap(),
        std::fs::read(d.join("out/delta.safetensors")).unwrap(),
        "the saved extract_lora result is the CLI's file, metadata included"
    );
    use mergesmith::lora::bake::Application;
    use mergesmith::lora::merge::{merge, MergeMode, MergeOptions};
    let source = |path: &Path, ratio: f64, blocks: Option<&str>| Application {
        file: mergesmith::lora::LoraFile::open(path).unwrap(),
        strength: ratio,
        blocks: blocks.map(|b| {
            mergesmith::lora::blocks::BlockWeights::parse(b, Family::builtin("sd1"), 0.0).unwrap()
        }),
    };
    let both = cli.join("both.safetensors");
    let merge_opts = MergeOptions {
        mode: MergeMode::Concat,
        ..Default::default()
    };
    let sources = [source(&delta, 0.5, None), source(&style, 0.8, Some("OUTD"))];
    merge(&sources, &merge_opts, &both, false).unwrap();
    assert!(tensor_bytes(&both) == tensor_bytes(&d.join("out/both.safetensors")));
    let app = mergesmith::lora::bake::Application {
        file: mergesmith::lora::LoraFile::open(&both).unwrap(),
        strength: 1.0,
        blocks: None,
    };
    let styled = cli.join("styled.safetensors");
    mergesmith::lora::bake::bake_file(
        &models.join("other.safetensors"),
        &[app],
        &styled,
        &Default::default(),
        false,
        false,
        false,
    )
    .unwrap();
    assert!(tensor_bytes(&styled) == tensor_bytes(&d.join("out/result.safetensors")));

    // A ratio of one merged LoRA rebuilds the merge and what uses it, not the extraction.
    let r = p.write(&text("3", "0.6"));
    let plan = p.plan(&r);
    assert_eq!(status(&plan, "delta"), &Status::Hit);
    assert_eq!(
        reasons(&plan, "both"),
        vec!["loras[1].strength: 0.8 -> 0.6"]
    );
    assert_eq!(
        sorted(built(&p.build(&r))),
        vec!["both", "both_file", "release", "styled"]
    );
    // A new rank re-extracts, and everything downstream follows.
    let r = p.write(&text("2", "0.6"));
    assert_eq!(built(&p.build(&r)).len(), 6);
    let ranks = mergesmith::lora::LoraFile::open(&d.join("out/delta.safetensors"))
        .unwrap()
        .summary()
        .ranks;
    assert_eq!(ranks.keys().copied().collect::<Vec<_>>(), vec![2]);
    // Nothing changed: nothing runs.
    assert!(built(&p.build(&r)).is_empty());
}

#[test]
fn lora_node_references_are_checked_by_kind() {
    let head = "version: 1\nmodels:\n  m: { path: a.safetensors }\n  n: { path: b.safetensors }\nnodes:\n  x: { extract_lora: { a: m, b: n } }\n";
    let e = errors(&format!(
        "{head}  y: {{ merge: weight_sum, a: m, b: x, alpha: 0.5 }}\n"
    ));
    assert_eq!(
        e.to_string(),
        "recipe.yaml:7:36: `x` makes a LoRA, not a checkpoint; bake it into one with a `lora` node"
    );
    let e = errors(&format!(
        "{head}  y: {{ merge: weight_sum, a: m, b: n, alpha: 0.5 }}\n  z: {{ lora: m, apply: [{{ file: y }}] }}\n"
    ));
    assert!(
        e.to_string()
            .starts_with("recipe.yaml:8:33: `y` is a checkpoint node; this takes a LoRA"),
        "{e}"
    );
    let e = errors(&format!(
        "{head}  y: {{ extract_lora: {{ a: m, b: x, rank: 0 }}, a: m }}\n"
    ));
    let messages: Vec<String> = e
        .errors
        .iter()
        .map(|e| format!("{}:{}: {} ({:?})", e.line, e.column, e.message, e.help))
        .collect();
    assert_eq!(
        messages,
        vec![
            "7:6: extract_lora node `y` takes no `a` (Some(\"options go under `extract_lora:`\"))",
            "7:33: `x` makes a LoRA, not a checkpoint; bake it into one with a `lora` node (None)",
            "7:42: a rank is at least 1 (None)",
        ]
    );
    let e = errors(&format!(
        "{head}  y: {{ merge_loras: {{ loras: [{{ file: x }}], clamp_quantile: 1.5 }} }}\n"
    ));
    assert!(
        e.to_string()
            .starts_with("recipe.yaml:7:61: clamp_quantile 1.5 is not in (0, 1]"),
        "{e}"
    );
    let e = errors(&format!("{head}  y: {{ merge_loras: {{ loras: [] }} }}\n"));
    assert!(e.to_string().contains("merge_loras needs `loras:"), "{e}");
}

#[test]
fn plan_checks_extractions_before_building() {
    let p = Project::new();
    synth(
        &p.dir.path().join("models"),
        "xl.safetensors",
        &tiny(Family::builtin("sdxl"), 4),
    );
    let r = p.write(
        "version: 1
models:
  base: { path: models/base.safetensors }
  xl:   { path: models/xl.safetensors }
nodes:
  delta: { extract_lora: { a: xl, b: base, rank: 4 } }
  keep: { save: delta, to: out/delta.safetensors }
",
    );
    let err = build::plan(&recipe::load(&r).unwrap(), &p.cache(), &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("node `delta`: cannot extract a LoRA between SDXL base"),
        "{err}"
    );
    assert_eq!(p.cache().stats().packs, 0);
}

#[test]
fn dice_tokens_are_drawn_as_supermerger_draws_them() {
    let yaml = |extra: &str| {
        format!(
            "version: 1\nmodels:\n  a: {{ path: a.safetensors }}\n  b: {{ path: b.safetensors }}\nnodes:\n  m:\n    merge: weight_sum\n    a: a\n    b: b\n{extra}"
        )
    };
    let spec = |text: &str| {
        let r = recipe::parse(Path::new("r.yaml"), text).unwrap_or_else(|e| panic!("{e}"));
        let Node::Merge(MergeNode { spec, .. }) = &r.nodes["m"] else {
            panic!()
        };
        spec.as_ref().clone()
    };
    // ALL_R with seed 42: numpy RandomState(42).rand(26) rounded to 3 decimals (numpy 2.4:
    // 0.375, 0.951, 0.732, 0.599, 0.156, ...).
    let s = spec(&yaml("    alpha: ALL_R\n    dice: { seed: 42 }\n"));
    let mergesmith::merge::Ratio::Blocks(v) = &s.alpha else {
        panic!("{:?}", s.alpha)
    };
    assert_eq!(v.len(), 26);
    assert_eq!(&v[..5], &[0.375, 0.951, 0.732, 0.599, 0.156]);
    // ER blocks become elemental entries drawn per key at planning time.
    let w = format!("ER,{}", vec!["0.5"; 25].join(","));
    let s = spec(&yaml(&format!(
        "    alpha: \"{w}\"\n    elemental: \"OUT01::0.2\"\n    dice: {{ seed: 1, round: 2 }}\n"
    )));
    assert_eq!(s.elemental.as_deref(), Some("OUT01::0.2,BASE::R"));
    assert_eq!(s.dice.as_ref().map(|d| (d.seed, d.round)), Some((1, 2)));
    // Tokens without a seed: an error at the field.
    let e = errors(&yaml("    alpha: ALL_U\n"));
    assert_eq!((e.errors[0].line, e.errors[0].column), (10, 12));
    assert!(
        e.errors[0].message.contains("dice seed"),
        "{}",
        e.errors[0].message
    );
}

#[test]
fn merge_ids_history_and_mergehistory_csv() {
    let p = Project::new();
    let cache = p.cache();
    let run = |alpha: &str| {
        let r = p.recipe(alpha);
        let reports = p.build(&r);
        cache.append_log(&r, &reports).unwrap();
    };
    run("0.3");
    run("0.3"); // all hits: no merge runs, no ID
    run("0.35");
    let merges = cache.merges();
    let ids: Vec<(u64, &str)> = merges.iter().map(|m| (m.id, m.node.as_str())).collect();
    assert_eq!(
        ids,
        vec![(1, "blend"), (2, "detail"), (3, "blend"), (4, "detail")]
    );
    assert_eq!(merges[2].merge["alpha"], 0.35);
    assert_eq!(merges[1].merge["calcmode"], "trainDifference");
    assert!(merges[3].matches("TRAINdifference") && !merges[2].matches("trainDifference"));
    // Exported as SuperMerger's mergehistory.csv and read back by the importer.
    let csv = mergesmith::build::merges::mergehistory_csv(&merges, &cache.memo().by_blake3());
    assert!(csv.starts_with("\"ID\",\"time\",\"name\""), "{csv}");
    let path = p.dir.path().join("mergehistory.csv");
    std::fs::write(&path, &csv).unwrap();
    let yaml = recipe::import::from_supermerger_history(&path, Some(4)).unwrap();
    let r = recipe::parse(&p.dir.path().join("r.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{}\n{yaml}\n{csv}", e.render()));
    let Node::Merge(MergeNode { spec, inputs, .. }) = &r.nodes["merge_4"] else {
        panic!("{yaml}")
    };
    assert_eq!(spec.mode, mergesmith::merge::Mode::AddDifference);
    assert_eq!(spec.calcmode, mergesmith::merge::CalcMode::TrainDifference);
    assert_eq!(spec.alpha, mergesmith::merge::Ratio::Scalar(0.3));
    assert_eq!(inputs.len(), 3);
    // Model files the cache hashed are named by AutoV2, as SuperMerger names them.
    let tuned = mergesmith::hashing::hash_file(&p.dir.path().join("models/tuned.safetensors"))
        .unwrap()
        .autov2;
    assert!(csv.contains(&tuned), "{csv}");
}
