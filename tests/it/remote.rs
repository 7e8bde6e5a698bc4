//! Remote caches against a real S3 implementation (s3s over s3s-fs, in this process, on a
//! loopback port) and a plain directory: read-through builds with identical bytes, sharded
//! builds assembled by a report from hits, corrupt objects discarded and rebuilt, local
//! verification, push / pull, and credentials kept out of everything mergesmith writes.

use crate::common::s3;

use std::path::{Path, PathBuf};
use std::process::Command;

use mergesmith::build::shard::{self, Shard};
use s3::S3Server;
use serde_json::Value;

const ACCESS_KEY: &str = "MSTESTAKIDQ7W3ZV";
const SECRET: &str = "mstest/Secret+9f8e7d6c5b4a";

const RECIPE: &str = concat!(
    "version: 1
models:
  a: { path: a.safetensors }
  b: { path: b.safetensors }
nodes:
",
    preview_nodes!(),
    "  sweep:
    xy:
      generate: look
      x: { type: alpha, values: [0.25, 0.75] }
      y: { type: seed, values: [1, 2] }
    to: grids
  release:
    save: blend
    to: out/release.safetensors
"
);

/// A folder with the two small models and the recipe.
fn project() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    crate::common::small_models(dir.path(), &["a", "b"]);
    let recipe = dir.path().join("r.yaml");
    std::fs::write(&recipe, RECIPE).unwrap();
    (dir, recipe)
}

/// Output of one mergesmith run.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The `--json` node reports, by name.
    fn nodes(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr));
        match v {
            Value::Array(a) => a,
            Value::Object(o) => o["nodes"].as_array().unwrap().clone(),
            _ => panic!("unexpected output {v}"),
        }
    }

    fn status(&self, name: &str) -> String {
        let nodes = self.nodes();
        let n = nodes.iter().find(|n| n["name"] == name).unwrap();
        n["status"].as_str().unwrap().to_string()
    }
}

fn mergesmith(args: &[&str], env: &[(&str, String)]) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mergesmith"));
    c.args(args);
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "MERGESMITH_REMOTE",
        "MERGESMITH_CACHE",
    ] {
        c.env_remove(k);
    }
    c.env("HOME", "/nonexistent-home");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type().unwrap().is_dir() {
                true => stack.push(e.path()),
                false => out.push(e.path()),
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Asserts that no credential appears in the runs' output or any file under `dir`.
fn assert_no_credentials(runs: &[&Run], dir: &Path) {
    for run in runs {
        for text in [&run.stdout, &run.stderr] {
            assert!(
                !text.contains(SECRET) && !text.contains(ACCESS_KEY),
                "{text}"
            );
        }
    }
    for f in files(dir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !contains(&bytes, SECRET) && !contains(&bytes, ACCESS_KEY),
            "credentials in {}",
            f.display()
        );
    }
}

fn build(recipe: &Path, cache: &Path, remote: &str, env: &[(&str, String)]) -> Run {
    let run = mergesmith(
        &[
            "build",
            path(recipe),
            "--cache",
            path(cache),
            "--remote",
            remote,
            "--json",
        ],
        env,
    );
    assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
    run
}

/// The files a build leaves in the project: the saved model and the grid.
fn outputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    ["out/release.safetensors", "grids/sweep.png"]
        .iter()
        .map(|f| (dir.join(f), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

fn wipe_outputs(dir: &Path) {
    std::fs::remove_dir_all(dir.join("out")).unwrap();
    std::fs::remove_dir_all(dir.join("grids")).unwrap();
}

#[test]
fn a_wiped_cache_rebuilds_from_the_s3_remote_with_identical_bytes_and_no_credentials() {
    let (project, recipe) = project();
    let d = project.path();
    let server = S3Server::start(&d.join("s3"), "bucket", ACCESS_KEY, SECRET);
    let env = server.env(ACCESS_KEY, SECRET);
    let remote = "s3://bucket/team";

    let first = build(&recipe, &d.join("cache1"), remote, &env);
    let before = outputs(d);
    assert!(
        files(&d.join("s3/bucket/team/v2/ac")).len() == 9,
        "entries: the blend, 2 cell merges (one per alpha), 5 images, the grid"
    );

    // A fresh machine: no local cache, no outputs.
    wipe_outputs(d);
    let second = build(&recipe, &d.join("cache2"), remote, &env);
    for n in second.nodes() {
        let name = n["name"].as_str().unwrap();
        match name {
            // They only copy what the remote had.
            "release" | "sweep" => assert_eq!(n["status"], "miss", "{name}"),
            _ => assert!(n["status"] == "hit" || n["status"] == "skip", "{n}"),
        }
        assert!(n["stored"].is_null() || name == "sweep", "{n}");
    }
    assert_eq!(
        second
            .nodes()
            .iter()
            .find(|n| n["name"] == "sweep")
            .unwrap()["stored"],
        0,
        "the grid comes from the remote, not composed again"
    );
    assert_eq!(outputs(d), before, "same bytes from the remote");
    // Only what was needed came down: the blend (for the save) and the grid, not the
    // cells' merges or images.
    let local = files(&d.join("cache2/v2"));
    let pngs = local
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"));
    assert_eq!(pngs.count(), 1);
    let manifests = local
        .iter()
        .filter(|p| p.to_string_lossy().contains("/results/"));
    assert_eq!(manifests.count(), 1);

    // Wrong credentials: the remote is unusable, the build goes on locally, and neither
    // the secret nor the key id shows.
    let wrong = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", format!("{SECRET}-wrong")),
        ("AWS_ENDPOINT_URL", server.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    wipe_outputs(d);
    let third = build(&recipe, &d.join("cache3"), remote, &wrong);
    assert!(third.stderr.contains("warning"), "{}", third.stderr);
    assert_eq!(third.status("blend"), "miss");
    assert_eq!(outputs(d), before, "built locally instead");
    assert_no_credentials(&[&first, &second, &third], d);
}

#[test]
fn two_shards_in_parallel_then_a_report_from_hits_only() {
    let (project, recipe) = project();
    let d = project.path();
    let server = S3Server::start(&d.join("s3"), "bucket", ACCESS_KEY, SECRET);
    let env = server.env(ACCESS_KEY, SECRET);
    let shards: Vec<_> = (0..2)
        .map(|i| {
            let (recipe, cache, env) = (recipe.clone(), d.join(format!("shard{i}")), env.clone());
            std::thread::spawn(move || {
                let shard = format!("{i}/2");
                let args = [
                    "build",
                    path(&recipe),
                    "--cache",
                    path(&cache),
                    "--remote",
                    "s3://bucket",
                    "--shard",
                    &shard,
                ];
                mergesmith(&args, &env)
            })
        })
        .collect();
    let runs: Vec<Run> = shards.into_iter().map(|t| t.join().unwrap()).collect();
    let mut cells = Vec::new();
    for run in &runs {
        assert!(run.ok, "{}\n{}", run.stdout, run.stderr);
        let line = run
            .stderr
            .lines()
            .find(|l| l.starts_with("shard "))
            .unwrap();
        cells.extend(
            line.split_once(": ")
                .unwrap()
                .1
                .split(", ")
                .map(String::from),
        );
    }
    cells.sort();
    assert_eq!(
        cells,
        [
            "blend",
            "look",
            "sweep.0.look",
            "sweep.1.look",
            "sweep.2.look",
            "sweep.3.look"
        ],
        "the shards split the work (the save's model, the image, the sweep's cells), once each"
    );

    let site = d.join("site");
    let report = mergesmith(
        &[
            "report",
            path(&recipe),
            "--cache",
            path(&d.join("final")),
            "--remote",
            "s3://bucket",
            "-o",
            path(&site),
            "--json",
        ],
        &env,
    );
    assert!(report.ok, "{}", report.stderr);
    for n in report.nodes() {
        let name = n["name"].as_str().unwrap();
        if name.ends_with(".look") {
            assert_eq!(n["status"], "hit", "{name}: generated by a shard");
        }
        if name.ends_with("blend") {
            assert_ne!(n["status"], "miss", "{name}: merged by a shard");
        }
    }
    let sweep = report
        .nodes()
        .into_iter()
        .find(|n| n["name"] == "sweep")
        .unwrap();
    assert_eq!(
        sweep["stored"], 1,
        "the grid is composed from the shards' cells"
    );
    assert!(site.join("index.html").is_file());
    assert_no_credentials(&[&runs[0], &runs[1], &report], d);
}

#[test]
fn a_corrupt_remote_object_is_discarded_and_rebuilt() {
    let (project, recipe) = project();
    let d = project.path();
    let server = S3Server::start(&d.join("s3"), "bucket", ACCESS_KEY, SECRET);
    let env = server.env(ACCESS_KEY, SECRET);
    build(&recipe, &d.join("cache1"), "s3://bucket", &env);
    let before = outputs(d);
    // The largest content object is a model pack: flip one byte in its middle.
    let cas = files(&d.join("s3/bucket/v2/cas"));
    let biggest = cas
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(biggest, &bytes).unwrap();

    wipe_outputs(d);
    let run = build(&recipe, &d.join("cache2"), "s3://bucket", &env);
    assert!(run.stderr.contains("corrupt"), "{}", run.stderr);
    assert!(run.stderr.contains("discarded"), "{}", run.stderr);
    assert_eq!(run.status("blend"), "miss", "rebuilt, not used");
    assert_eq!(outputs(d), before, "the rebuilt model has the same bytes");
    // The rebuild went back up: a third machine gets it from the remote intact.
    wipe_outputs(d);
    let third = build(&recipe, &d.join("cache3"), "s3://bucket", &env);
    assert_eq!(third.status("blend"), "hit", "{}", third.stderr);
    assert!(!third.stderr.contains("discarded"), "{}", third.stderr);
    assert_eq!(outputs(d), before);
}

#[test]
fn push_and_pull_through_a_directory_remote() {
    let (project, recipe) = project();
    let d = project.path();
    let remote = d.join("share");
    let local = mergesmith(
        &["build", path(&recipe), "--cache", path(&d.join("c1"))],
        &[],
    );
    assert!(local.ok, "{}", local.stderr);
    let push = mergesmith(
        &[
            "push",
            path(&recipe),
            "--cache",
            path(&d.join("c1")),
            "--remote",
            path(&remote),
            "--json",
        ],
        &[],
    );
    assert!(push.ok, "{}", push.stderr);
    let pushed: Value = serde_json::from_str(&push.stdout).unwrap();
    assert_eq!(pushed["present"], pushed["items"]);
    assert_eq!(pushed["entries_created"], 9, "{pushed}");

    let pull = mergesmith(
        &[
            "pull",
            path(&recipe),
            "--cache",
            path(&d.join("c2")),
            "--remote",
            &format!("file://{}", remote.display()),
            "--json",
        ],
        &[],
    );
    assert!(pull.ok, "{}", pull.stderr);
    let pulled: Value = serde_json::from_str(&pull.stdout).unwrap();
    assert_eq!(pulled["present"], pulled["items"]);
    // Offline now: everything is a hit in the pulled cache.
    let plan = mergesmith(
        &[
            "plan",
            path(&recipe),
            "--cache",
            path(&d.join("c2")),
            "--json",
        ],
        &[],
    );
    let nodes: Vec<Value> = serde_json::from_str(&plan.stdout).unwrap();
    for n in nodes {
        let name = n["name"].as_str().unwrap();
        if !matches!(name, "release" | "sweep") {
            assert_eq!(n["status"], "hit", "{n}");
        }
    }
}

#[test]
fn cache_verify_removes_a_corrupt_pack_and_the_build_replaces_it() {
    let (project, recipe) = project();
    let d = project.path();
    let cache = d.join("cache");
    let args = ["build", path(&recipe), "--cache", path(&cache), "--json"];
    assert!(mergesmith(&args, &[]).ok);
    let before = outputs(d);
    let verify = ["cache", "verify", "--cache", path(&cache), "--json"];
    let clean = mergesmith(&verify, &[]);
    assert!(clean.ok, "{}", clean.stderr);
    let v: Value = serde_json::from_str(&clean.stdout).unwrap();
    assert_eq!(v["unrecorded"], 0, "every pack has its digest");
    assert!(v["checked"].as_u64().unwrap() >= 10);

    let pack = files(&cache.join("v2/packs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let found = mergesmith(&verify, &[]);
    assert!(!found.ok, "a corrupt pack fails verification");
    let v: Value = serde_json::from_str(&found.stdout).unwrap();
    assert_eq!(v["removed"].as_array().unwrap().len(), 1);
    assert!(!pack.exists());

    wipe_outputs(d);
    let rebuilt = mergesmith(&args, &[]);
    assert!(rebuilt.ok, "{}", rebuilt.stderr);
    assert_eq!(outputs(d), before);
}

#[test]
fn shards_are_deterministic_partitions_balanced_by_cost() {
    let (project, recipe) = project();
    let text = RECIPE.replace("[0.25, 0.75]", "[0, 0.2, 0.4, 0.6, 0.8, 1]");
    std::fs::write(&recipe, text).unwrap();
    let r = mergesmith::recipe::load(&recipe).unwrap();
    for n in 1..=4 {
        let mut all = Vec::new();
        let mut sizes = Vec::new();
        for i in 0..n {
            let shard = Shard { index: i, count: n };
            let mine = shard::targets(&r, &[], shard).unwrap();
            assert_eq!(mine, shard::targets(&r, &[], shard).unwrap());
            sizes.push(mine.len());
            all.extend(mine);
        }
        let total = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), total, "{n} shards: no unit twice");
        assert_eq!(total, 12 + 2, "12 cells, the image and the saved model");
        let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(hi - lo <= 2, "{n} shards: {sizes:?}");
    }
    drop(project);
}
