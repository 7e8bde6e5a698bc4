//! The `mergesmith` binary end to end: synth, inspect, exit codes, determinism.

use std::path::Path;
use std::process::{Command, Output};

fn ms(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .args(args)
        .env("MERGESMITH_CACHE", cache)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

#[test]
fn synth_is_deterministic_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.safetensors");
    let b = d.join("b.safetensors");
    ok(ms(
        &[
            "--threads",
            "1",
            "synth",
            "--arch",
            "sdxl",
            "--seed",
            "9",
            "-o",
            a.to_str().unwrap(),
        ],
        d,
    ));
    ok(ms(
        &[
            "--threads",
            "2",
            "synth",
            "--arch",
            "sdxl",
            "--seed",
            "9",
            "-o",
            b.to_str().unwrap(),
        ],
        d,
    ));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let c = d.join("c.safetensors");
    ok(ms(
        &[
            "synth",
            "--arch",
            "sdxl",
            "--seed",
            "10",
            "-o",
            c.to_str().unwrap(),
        ],
        d,
    ));
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn inspect_reports_and_memoizes_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = d.join("m.safetensors");
    let out = json(ms(
        &[
            "synth",
            "--arch",
            "sd2",
            "--dtype",
            "bf16",
            "-o",
            m.to_str().unwrap(),
            "--json",
        ],
        d,
    ));
    // SD1's 1143 keys, minus 197 CLIP-L keys, plus OpenCLIP-H: 24 blocks x 12 + 6.
    assert_eq!(out["tensors"], 1143 - 197 + 24 * 12 + 6);

    let r = json(ms(&["inspect", m.to_str().unwrap(), "--json"], d));
    assert_eq!(r["arch"]["family"], "sd2");
    assert_eq!(r["blocks"].as_array().unwrap().len(), 26);
    assert_eq!(r["hash_source"], "computed");
    let sha = r["hashes"]["sha256"].as_str().unwrap().to_string();
    assert_eq!(r["hashes"]["autov2"].as_str().unwrap(), &sha[..10]);
    assert!(r["dtypes"]["BF16"]["tensors"].as_u64().unwrap() > 1000);
    // Metadata values that are JSON documents come back parsed.
    assert_eq!(r["metadata"]["mergesmith.synth"]["family"], "sd2");
    let total: u64 = r["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["tensors"].as_u64().unwrap())
        .sum::<u64>()
        + r["unblocked"]["tensors"].as_u64().unwrap();
    assert_eq!(total, r["total"]["tensors"].as_u64().unwrap());

    // Second run: from the memo, same hashes.
    let r2 = json(ms(&["inspect", m.to_str().unwrap(), "--json"], d));
    assert_eq!(r2["hash_source"], "memo");
    assert_eq!(r2["hashes"], r["hashes"]);

    // Replacing the file (new inode/mtime/size) invalidates the memo.
    let m2 = d.join("m2.safetensors");
    ok(ms(
        &["synth", "--arch", "sd1", "-o", m2.to_str().unwrap()],
        d,
    ));
    std::fs::rename(&m2, &m).unwrap();
    let r3 = json(ms(&["inspect", m.to_str().unwrap(), "--json"], d));
    assert_eq!(r3["hash_source"], "computed");
    assert_ne!(r3["hashes"]["sha256"], r["hashes"]["sha256"]);

    // Human output and the key listing.
    let text = ok(ms(
        &["inspect", m.to_str().unwrap(), "--keys", "--no-hash"],
        d,
    ));
    assert!(text.contains("architecture:  SD1.x"));
    assert!(text.contains("model.diffusion_model.input_blocks.4.1.proj_in.weight"));
    assert!(text.contains("(not merged)"));
}

#[test]
fn related_models_from_base_and_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, c) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("c.safetensors"),
    );
    ok(ms(
        &[
            "synth",
            "--arch",
            "sd1",
            "--seed",
            "1",
            "--dtype",
            "fp32",
            "-o",
            a.to_str().unwrap(),
        ],
        d,
    ));
    ok(ms(
        &[
            "synth",
            "--base",
            a.to_str().unwrap(),
            "--strength",
            "0.1",
            "--seed",
            "2",
            "--dtype",
            "fp32",
            "-o",
            b.to_str().unwrap(),
        ],
        d,
    ));
    ok(ms(
        &[
            "synth",
            "--arch",
            "sd1",
            "--seed",
            "3",
            "--dtype",
            "fp32",
            "--copy-from",
            a.to_str().unwrap(),
            "--copy",
            "vae,te1",
            "-o",
            c.to_str().unwrap(),
        ],
        d,
    ));
    let (ca, cb, cc) = (
        mergesmith::checkpoint::Checkpoint::open(&a).unwrap(),
        mergesmith::checkpoint::Checkpoint::open(&b).unwrap(),
        mergesmith::checkpoint::Checkpoint::open(&c).unwrap(),
    );
    let f = |ck: &mergesmith::checkpoint::Checkpoint, k: &str| -> Vec<f32> {
        let v = ck.view(k).unwrap();
        mergesmith::convert::to_f32(v.dtype, &v.data).unwrap()
    };
    // Perturbed: close to A (relative change about the requested 0.1), but not equal.
    let k = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    let (x, y) = (f(&ca, k), f(&cb, k));
    let num: f64 = x
        .iter()
        .zip(&y)
        .map(|(p, q)| ((p - q) as f64).powi(2))
        .sum();
    let den: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    assert!(rel > 0.05 && rel < 0.2, "relative change {rel}");
    // Buffers are not perturbed.
    assert!(f(&ca, "alphas_cumprod") == f(&cb, "alphas_cumprod"));
    // Copied components are identical; others differ.
    let vae = "first_stage_model.decoder.conv_in.weight";
    assert!(f(&ca, vae) == f(&cc, vae), "copied VAE must be identical");
    assert!(f(&ca, k) != f(&cc, k), "the UNet was not copied");
}

#[test]
fn errors_name_the_file_and_set_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bad = d.join("bad.safetensors");
    std::fs::write(&bad, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops").unwrap();
    let out = ms(&["inspect", bad.to_str().unwrap()], d);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("bad.safetensors") && err.contains("not valid JSON"),
        "{err}"
    );

    let m = d.join("m.safetensors");
    ok(ms(&["synth", "-o", m.to_str().unwrap()], d));
    let before = std::fs::read(&m).unwrap();
    let out = ms(&["synth", "--seed", "5", "-o", m.to_str().unwrap()], d);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    assert_eq!(
        std::fs::read(&m).unwrap(),
        before,
        "existing file untouched"
    );
    ok(ms(
        &[
            "synth",
            "--seed",
            "5",
            "--overwrite",
            "-o",
            m.to_str().unwrap(),
        ],
        d,
    ));
    assert_ne!(std::fs::read(&m).unwrap(), before);

    let out = ms(&["synth", "--arch", "sd9", "-o", "x"], d);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn merge_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, out) = (
        d.join("a.safetensors"),
        d.join("b.safetensors"),
        d.join("out.safetensors"),
    );
    ok(ms(&["synth", "--seed", "1", "-o", a.to_str().unwrap()], d));
    ok(ms(
        &[
            "synth",
            "--base",
            a.to_str().unwrap(),
            "--seed",
            "2",
            "-o",
            b.to_str().unwrap(),
        ],
        d,
    ));
    let (a, b, o) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let r = json(ms(
        &[
            "merge",
            "-a",
            a,
            "-b",
            b,
            "--mbw",
            "GRAD_V",
            "--elemental",
            "OUT06:attn:0.9",
            "-o",
            o,
            "--json",
        ],
        d,
    ));
    assert_eq!(r["plan"]["architecture"]["family"], "sd1");
    assert!(r["report"]["blended"].as_u64().unwrap() > 500);
    let meta = json(ms(&["inspect", o, "--json", "--no-hash"], d));
    assert_eq!(meta["metadata"]["sd_merge_recipe"]["mbw"], true);

    // Refusals: an existing output (1), a calcmode for another mode (2), blocks without a filter (2).
    let out1 = ms(&["merge", "-a", a, "-b", b, "-o", o], d);
    assert_eq!(out1.status.code(), Some(1));
    let out2 = ms(
        &[
            "merge",
            "-a",
            a,
            "-b",
            b,
            "--calcmode",
            "trainDifference",
            "-o",
            "x.safetensors",
        ],
        d,
    );
    assert_eq!(out2.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out2.stderr).contains("Add difference"));
    let out3 = ms(
        &[
            "merge",
            "-a",
            a,
            "-b",
            b,
            "--blocks",
            "IN01",
            "-o",
            "x.safetensors",
        ],
        d,
    );
    assert_eq!(out3.status.code(), Some(2));
    assert!(!d.join("x.safetensors").exists());
}

/// `mergesmith` run in `dir` with no cache in the environment.
fn ms_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .args(args)
        .current_dir(dir)
        .env_remove("MERGESMITH_CACHE")
        .output()
        .unwrap()
}

#[test]
fn every_command_finds_the_cache_build_filled_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("proj");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(proj.join("models")).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    for (name, seed) in [("a", 1), ("b", 2)] {
        crate::common::synth(
            &proj.join("models"),
            &format!("{name}.safetensors"),
            &crate::common::tiny(mergesmith::arch::Family::builtin("sd1"), seed),
        );
    }
    let nodes = "  m:\n    merge: weight_sum\n    a: a\n    b: b\n    alpha: 0.3\n";
    let text = crate::common::recipe_yaml("models/", &["a", "b"], nodes);
    std::fs::write(proj.join("mergesmith.yaml"), text).unwrap();
    let recipe = "../proj/mergesmith.yaml";
    ok(ms_in(&elsewhere, &["build", recipe]));
    let cache = std::fs::canonicalize(proj.join("cache")).unwrap();
    assert!(
        !elsewhere.join("cache").exists(),
        "build filled the recipe's cache"
    );

    // Every maintenance command, from elsewhere with --recipe and from the project with
    // nothing, reads the cache that build filled.
    let stats = |d: &Path, args: &[&str]| {
        let s = json(ms_in(d, &[&["cache", "--json"], args].concat()));
        (
            std::fs::canonicalize(d.join(s["path"].as_str().unwrap())).unwrap(),
            s["results"].as_u64().unwrap(),
        )
    };
    let layout = cache.join(mergesmith::store::LAYOUT);
    assert_eq!(
        stats(&elsewhere, &["--recipe", recipe]),
        (layout.clone(), 1)
    );
    assert_eq!(stats(&proj, &[]), (layout.clone(), 1));
    let log = json(ms_in(&elsewhere, &["log", "--json", "--recipe", recipe]));
    assert_eq!(log.as_array().unwrap().len(), 1);
    let gc = ok(ms_in(
        &elsewhere,
        &["gc", "--max-size", "0", "--recipe", recipe],
    ));
    assert!(gc.starts_with("removed 1 packs"), "{gc}");
    ok(ms_in(&elsewhere, &["build", recipe]));
    let cleaned = json(ms_in(&elsewhere, &["clean", "--json", "--recipe", recipe]));
    assert_eq!(cleaned["results"], 1);
    assert_eq!(stats(&proj, &[]), (layout, 0));
    assert!(!elsewhere.join("cache").exists());
}

#[test]
fn flux_fp8_files_merge_as_a_new_user_would_merge_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cache = d.join("cache");
    let m = d.join("models");
    std::fs::create_dir_all(&m).unwrap();
    let p = |n: &str| m.join(n).to_string_lossy().into_owned();
    // Two BFL transformers stored in fp8, one ComfyUI all-in-one in bf16.
    for (name, seed, extra) in [
        (
            "a.safetensors",
            "1",
            ["--layout", "bfl", "--dtype", "fp8_e4m3"],
        ),
        (
            "b.safetensors",
            "2",
            ["--layout", "bfl", "--dtype", "fp8_e4m3"],
        ),
        (
            "c.safetensors",
            "3",
            ["--layout", "comfyui", "--dtype", "bf16"],
        ),
    ] {
        ok(ms(
            &[
                &["synth", "--arch", "flux", "--seed", seed, "-o", &p(name)][..],
                &extra[..],
            ]
            .concat(),
            &cache,
        ));
    }
    let out = p("m.safetensors");
    let r = json(ms(
        &[
            "merge",
            "-a",
            &p("a.safetensors"),
            "-b",
            &p("b.safetensors"),
            "--alpha",
            "0.5",
            "-o",
            &out,
            "--json",
        ],
        &cache,
    ));
    assert_eq!(r["plan"]["architecture"]["family"], "flux");
    assert_eq!(r["plan"]["architecture"]["layout"], "bfl");
    assert_eq!(
        r["plan"]["blended"], r["report"]["tensors"],
        "every tensor blended"
    );
    let info = json(ms(&["inspect", &out, "--json", "--no-hash"], &cache));
    assert_eq!(
        info["dtypes"]["F8_E4M3"]["tensors"], r["report"]["tensors"],
        "{info}"
    );

    // A recipe over mixed layouts with a named block list; the second build is all hits.
    let nodes = "  m:\n    merge: weight_sum\n    a: a\n    b: c\n    alpha: 0.25\n    block_list: supermerger\n  out:\n    save: m\n    to: out/flux.safetensors\n";
    std::fs::write(
        d.join("mergesmith.yaml"),
        crate::common::recipe_yaml("models/", &["a", "c"], nodes),
    )
    .unwrap();
    let first = ok(ms_in(d, &["build", "mergesmith.yaml"]));
    assert!(d.join("out/flux.safetensors").exists(), "{first}");
    let again = ok(ms_in(d, &["build", "mergesmith.yaml"]));
    assert!(
        again.lines().filter(|l| l.starts_with("cached")).count() == 2,
        "{again}"
    );
    assert!(again.contains("0 built"), "{again}");

    // Two files with nothing to blend: exit code 2 and the reason, no output (a missing B
    // fails first).
    let merge_nothing = || {
        ms(
            &[
                "merge",
                "-a",
                &p("a.safetensors"),
                "-b",
                &p("nothing.safetensors"),
                "--alpha",
                "0.5",
                "-o",
                &p("x.safetensors"),
            ],
            &cache,
        )
    };
    assert!(!merge_nothing().status.success());
    crate::common::raw_safetensors(
        &m.join("nothing.safetensors"),
        r#"{"step":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let err = merge_nothing();
    assert_eq!(err.status.code(), Some(2));
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(
        text.contains("nothing to merge") && text.contains("missing from B"),
        "{text}"
    );
    assert!(!m.join("x.safetensors").exists());

    let families = json(ms(&["families", "--json"], &cache));
    assert!(families
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["id"] == "flux"));
}
