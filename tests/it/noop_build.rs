//! An up-to-date build reads nothing: no checkpoint is opened, no tensor byte is read, no
//! file is hashed. The I/O counters are process-wide, so the measuring test runs alone in a
//! child process of this test binary (`common::run_alone`).

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::build::{self, BuildOptions, Status};
use mergesmith::checkpoint::counters;
use mergesmith::recipe;
use mergesmith::store::Cache;

#[test]
fn a_ten_node_rebuild_reads_no_tensor_data() {
    run_alone("noop_build::ten_node_rebuild_alone");
}

/// The measurement itself; it runs only in the child process that `run_alone` starts.
#[test]
#[ignore = "run alone in a child process by a_ten_node_rebuild_reads_no_tensor_data"]
fn ten_node_rebuild_alone() {
    if !is_alone() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("models");
    std::fs::create_dir_all(&m).unwrap();
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        synth(
            &m,
            &format!("{name}.safetensors"),
            &tiny(Family::builtin("sd1"), seed),
        );
    }
    // Nine merges in a chain that keeps mixing the models back in, and one save.
    let mut text = recipe_yaml("models/", &["a", "b", "c"], "");
    let mut prev = "a".to_string();
    for i in 1..=9 {
        let other = ["b", "c"][i % 2];
        text.push_str(&format!(
            "  m{i}:\n    merge: weight_sum\n    a: {prev}\n    b: {other}\n    alpha: 0.{i}\n"
        ));
        prev = format!("m{i}");
    }
    text.push_str(&format!(
        "  out:\n    save: {prev}\n    to: out/final.safetensors\n"
    ));
    let path = dir.path().join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let cache = Cache::new(&dir.path().join("cache"));
    let opts = BuildOptions::default();

    let before = counters::snapshot();
    let first = build::build(&recipe::load(&path).unwrap(), &cache, &[], &opts).unwrap();
    let cold = counters::snapshot();
    assert_eq!(first.len(), 10);
    assert!(first
        .iter()
        .all(|r| matches!(r.plan.status, Status::Miss(_))));
    assert!(cold.tensor_bytes > before.tensor_bytes && cold.files_opened > before.files_opened);

    let started = std::time::Instant::now();
    let second = build::build(&recipe::load(&path).unwrap(), &cache, &[], &opts).unwrap();
    let elapsed = started.elapsed();
    let after = counters::snapshot();
    assert!(second.iter().all(|r| r.plan.status == Status::Hit));
    assert_eq!(
        after, cold,
        "a no-op build opened no checkpoint, read no tensor and hashed no file"
    );
    eprintln!(
        "no-op build of 10 nodes: {:.1} ms",
        elapsed.as_secs_f64() * 1e3
    );
}
