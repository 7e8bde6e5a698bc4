//! List merge methods on tiny fp32 SD1 models against straightforward f64 references written
//! here; their recipe and CLI surfaces, errors, reproducible randomness and per-tensor keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::build::{self, BuildOptions};
use mergesmith::checkpoint::Checkpoint;
use mergesmith::dtype::FloatType;
use mergesmith::merge::method::{find, Written};
use mergesmith::merge::multi::{merge_files, ListFiles, ListOp, ListSpec};
use mergesmith::merge::{Presets, Ratio, RunOptions};
use mergesmith::nodes::Node;
use mergesmith::recipe;
use mergesmith::store::Cache;
use mergesmith::synth::{Perturb, SynthOptions};

/// A base and three fine-tunes of it (fp32), in a temporary directory.
struct Four {
    dir: tempfile::TempDir,
    base: PathBuf,
    ft: Vec<PathBuf>,
}

fn four() -> Four {
    let dir = tempfile::tempdir().unwrap();
    let opts = |seed| SynthOptions {
        dtype: FloatType::Fp32,
        ..tiny(Family::builtin("sd1"), seed)
    };
    let base = synth(dir.path(), "base.safetensors", &opts(40));
    let ft = (1..=3)
        .map(|i| {
            let mut o = opts(40 + i);
            o.perturb = Some(Perturb {
                base: base.clone(),
                strength: 0.4,
                rank: 0,
            });
            synth(dir.path(), &format!("ft{i}.safetensors"), &o)
        })
        .collect();
    Four { dir, base, ft }
}

type Tensors = BTreeMap<String, Vec<f32>>;

fn tensors(p: &Path) -> Tensors {
    let ck = Checkpoint::open(p).unwrap();
    ck.tensors()
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| {
            let v = ck.view(&t.name).unwrap();
            (
                t.name.clone(),
                mergesmith::convert::to_f32(v.dtype, &v.data).unwrap(),
            )
        })
        .collect()
}

fn spec(method: &str, weights: Vec<Ratio>, params: &[(&str, Written)]) -> ListSpec {
    let m = find(method).unwrap();
    let written = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    ListSpec {
        method: m,
        params: m.params_of(&written, &Presets::default()).unwrap(),
        weights,
        dtype: None,
        block_list: None,
    }
}

/// Runs a list merge; returns the output's tensors and which tensors were merged.
fn merge(
    f: &Four,
    s: &ListSpec,
    base: bool,
    deltas: bool,
    n: usize,
    out: &str,
) -> (Tensors, Vec<String>) {
    let files = ListFiles {
        base: base.then(|| f.base.clone()),
        terms: f.ft[..n]
            .iter()
            .map(|p| (p.clone(), deltas.then(|| f.base.clone())))
            .collect(),
    };
    let path = f.dir.path().join(out);
    let (plan, _) = merge_files(
        &files,
        s,
        &path,
        &mergesmith::store::memo(f.dir.path()),
        &RunOptions::default(),
    )
    .unwrap();
    let merged = plan
        .keys
        .iter()
        .filter(|k| k.op != ListOp::Copy)
        .map(|k| k.name.clone())
        .collect();
    (tensors(&path), merged)
}

/// An f64 reference: (tensor name, base values, input values) -> expected values.
type Reference<'a> = dyn Fn(&str, &[f32], &[&Vec<f32>]) -> Vec<f64> + 'a;

/// Compares every merged tensor with `reference(name, base, inputs)` (f64), within `tol`
/// relative to max(1, |want|).
fn check(
    f: &Four,
    got: &Tensors,
    merged: &[String],
    n: usize,
    tol: f64,
    reference: &Reference<'_>,
) {
    let base = tensors(&f.base);
    let ins: Vec<Tensors> = f.ft[..n].iter().map(|p| tensors(p)).collect();
    assert!(merged.len() > 1000, "{} merged", merged.len());
    let mut worst = 0f64;
    for name in merged {
        let xs: Vec<&Vec<f32>> = ins.iter().map(|t| &t[name]).collect();
        let want = reference(name, &base[name], &xs);
        for (g, w) in got[name].iter().zip(&want) {
            let err = (*g as f64 - w).abs() / w.abs().max(1.0);
            worst = worst.max(err);
            assert!(err <= tol, "{name}: got {g}, want {w}");
        }
    }
    eprintln!("largest relative difference {worst:e}");
}

/// δ = x − base in f32, as the kernels subtract.
fn delta(x: &[f32], b: &[f32]) -> Vec<f64> {
    x.iter().zip(b).map(|(x, b)| (x - b) as f64).collect()
}

#[test]
fn linear_and_task_arithmetic_match_f64() {
    let f = four();
    // Input 1's weight is a 26-value SD1 block vector: IN00-IN11 0.2, the rest 1.
    let mut v = vec![1.0; 26];
    v[1..13].iter_mut().for_each(|x| *x = 0.2);
    let weights = vec![Ratio::Scalar(0.5), Ratio::Blocks(v), Ratio::Scalar(0.25)];
    let s = spec("linear", weights.clone(), &[]);
    let (got, merged) = merge(&f, &s, false, false, 3, "linear.safetensors");
    let family = Family::builtin("sd1");
    let w_of = |name: &str| -> Vec<f64> {
        let class = mergesmith::arch::classify(family, name);
        let block = class.block.as_deref().unwrap_or("BASE");
        let w1 = if block.starts_with("IN") { 0.2 } else { 1.0 };
        vec![0.5, w1, 0.25]
    };
    check(&f, &got, &merged, 3, 1e-6, &|name, _, xs| {
        let w = w_of(name);
        let total: f64 = w.iter().sum();
        (0..xs[0].len())
            .map(|e| xs.iter().zip(&w).map(|(x, w)| x[e] as f64 * w).sum::<f64>() / total)
            .collect()
    });
    let s = spec(
        "task_arithmetic",
        weights,
        &[("lambda", Written::Number(0.8))],
    );
    let (got, merged) = merge(&f, &s, true, true, 3, "ta.safetensors");
    check(&f, &got, &merged, 3, 1e-6, &|name, b, xs| {
        let w = w_of(name);
        let ds: Vec<Vec<f64>> = xs.iter().map(|x| delta(x, b)).collect();
        (0..b.len())
            .map(|e| b[e] as f64 + 0.8 * ds.iter().zip(&w).map(|(d, w)| d[e] * w).sum::<f64>())
            .collect()
    });
}

#[test]
fn ties_matches_f64() {
    let f = four();
    let weights = vec![Ratio::Scalar(1.0), Ratio::Scalar(0.5), Ratio::Scalar(0.75)];
    let s = spec("ties", weights, &[("density", Written::Number(0.3))]);
    let (got, merged) = merge(&f, &s, true, true, 3, "ties.safetensors");
    let w = [1.0, 0.5, 0.75];
    check(&f, &got, &merged, 3, 1e-6, &|_, b, xs| {
        let n = b.len();
        let k = ((0.3 * n as f64).floor() as usize).max(1);
        let trimmed: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                let d = delta(x, b);
                let mut idx: Vec<usize> = (0..n).collect();
                // Largest magnitudes first, equal ones by lower index.
                idx.sort_by(|&i, &j| d[j].abs().total_cmp(&d[i].abs()).then(i.cmp(&j)));
                let mut t = vec![0.0; n];
                for &i in &idx[..k.min(n)] {
                    t[i] = d[i];
                }
                t
            })
            .collect();
        (0..n)
            .map(|e| {
                let wd: Vec<f64> = trimmed.iter().zip(&w).map(|(t, w)| t[e] * w).collect();
                let s = if wd.iter().sum::<f64>() >= 0.0 {
                    1.0
                } else {
                    -1.0
                };
                let (mut num, mut den) = (0.0, 0.0);
                for (x, w) in wd.iter().zip(&w) {
                    if *x != 0.0 && x.signum() == s {
                        num += x;
                        den += w;
                    }
                }
                b[e] as f64 + if den == 0.0 { num } else { num / den }
            })
            .collect()
    });
}

#[test]
fn slerp_model_stock_and_median_match_f64() {
    let f = four();
    let s = spec(
        "slerp",
        vec![Ratio::Scalar(1.0); 2],
        &[("t", Written::Number(0.3))],
    );
    let (got, merged) = merge(&f, &s, false, false, 2, "slerp.safetensors");
    check(&f, &got, &merged, 2, 1e-5, &|_, _, xs| {
        let (a, b) = (xs[0], xs[1]);
        let dot: f64 = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum();
        let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let c = (dot / (na.max(1e-300) * nb.max(1e-300))).clamp(-1.0, 1.0);
        let (s0, s1) = if c.abs() > 0.9995 || na <= 1e-8 || nb <= 1e-8 {
            (0.7, 0.3)
        } else {
            let th = c.acos();
            ((0.7 * th).sin() / th.sin(), (0.3 * th).sin() / th.sin())
        };
        a.iter()
            .zip(b.iter())
            .map(|(x, y)| s0 * *x as f64 + s1 * *y as f64)
            .collect()
    });

    let s = spec("model_stock", vec![Ratio::Scalar(1.0); 3], &[]);
    let (got, merged) = merge(&f, &s, true, false, 3, "stock.safetensors");
    check(&f, &got, &merged, 3, 1e-5, &|_, b, xs| {
        let ds: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                x.iter()
                    .zip(b)
                    .map(|(x, b)| *x as f64 - *b as f64)
                    .collect()
            })
            .collect();
        let norm = |d: &Vec<f64>| d.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut cos = Vec::new();
        for i in 0..3 {
            for j in i + 1..3 {
                let dot: f64 = ds[i].iter().zip(&ds[j]).map(|(x, y)| x * y).sum();
                cos.push((dot / (norm(&ds[i]) * norm(&ds[j])).max(1e-6)).clamp(-1.0, 1.0));
            }
        }
        let c = cos.iter().sum::<f64>() / cos.len() as f64;
        let den = 1.0 + 2.0 * c;
        let t = if den.abs() < 1e-6 { 0.0 } else { 3.0 * c / den };
        (0..b.len())
            .map(|e| {
                let mean = xs.iter().map(|x| x[e] as f64).sum::<f64>() / 3.0;
                t * mean + (1.0 - t) * b[e] as f64
            })
            .collect()
    });

    let s = spec("geometric_median", vec![Ratio::Scalar(1.0); 3], &[]);
    let (got, merged) = merge(&f, &s, false, false, 3, "median.safetensors");
    check(&f, &got, &merged, 3, 1e-5, &|_, _, xs| {
        // Weiszfeld from the mean, weights 1/max(distance, 1e-6), until the mean distance
        // stops changing (relative 1e-20) or 100 steps.
        let n = xs[0].len();
        let pts: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| x.iter().map(|v| *v as f64).collect())
            .collect();
        let mut m: Vec<f64> = (0..n)
            .map(|e| pts.iter().map(|p| p[e]).sum::<f64>() / 3.0)
            .collect();
        let mut last: Option<f64> = None;
        for _ in 0..100 {
            let d: Vec<f64> = pts
                .iter()
                .map(|p| {
                    p.iter()
                        .zip(&m)
                        .map(|(x, y)| (x - y).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .collect();
            let obj = d.iter().sum::<f64>() / 3.0;
            if last.is_some_and(|l| (l - obj).abs() <= 1e-20 * obj) {
                break;
            }
            last = Some(obj);
            let w: Vec<f64> = d.iter().map(|d| 1.0 / d.max(1e-6)).collect();
            let tw: f64 = w.iter().sum();
            m = (0..n)
                .map(|e| pts.iter().zip(&w).map(|(p, w)| p[e] * w).sum::<f64>() / tw)
                .collect();
        }
        m
    });
}

/// Runs the CLI; returns the output's bytes.
fn cli_merge(f: &Four, args: &[&str], out: &str, threads: &str) -> Vec<u8> {
    let path = f.dir.path().join(out);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .arg("merge")
        .args(args)
        .args(["--base", f.base.to_str().unwrap()])
        .args(f.ft.iter().flat_map(|p| ["--delta", p.to_str().unwrap()]))
        .args(["-o", path.to_str().unwrap(), "--overwrite", "--json"])
        .env("MERGESMITH_THREADS", threads)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(&path).unwrap()
}

#[test]
fn random_drops_depend_on_the_seed_only() {
    let f = four();
    for m in ["dare", "dare_ties", "della"] {
        let args = |seed: &str| {
            vec![
                "--mode".to_string(),
                m.to_string(),
                "-p".into(),
                "density=0.4".into(),
                "-p".into(),
                format!("seed={seed}"),
            ]
        };
        let a1 = args("3");
        let a: Vec<&str> = a1.iter().map(String::as_str).collect();
        let one = cli_merge(&f, &a, &format!("{m}1.safetensors"), "1");
        let two = cli_merge(&f, &a, &format!("{m}2.safetensors"), "2");
        assert!(one == two, "{m}: thread count changed the result");
        let a2 = args("4");
        let b: Vec<&str> = a2.iter().map(String::as_str).collect();
        let other = cli_merge(&f, &b, &format!("{m}3.safetensors"), "2");
        assert!(one != other, "{m}: the seed changed nothing");
    }
}

#[test]
fn dare_and_della_keep_the_expected_fractions() {
    let f = four();
    let base = tensors(&f.base);
    let ft = tensors(&f.ft[0]);
    for (method, rescale) in [("dare", "inverse"), ("della_linear", "none")] {
        let s = spec(
            method,
            vec![Ratio::Scalar(1.0)],
            &[
                ("density", Written::Number(0.4)),
                ("rescale", Written::Text(rescale.into())),
                ("seed", Written::Number(11.0)),
            ],
        );
        let (got, merged) = merge(&f, &s, true, true, 1, &format!("{method}.safetensors"));
        let r = if rescale == "inverse" { 1.0 / 0.4 } else { 1.0 };
        let (mut kept, mut total) = (0usize, 0usize);
        // DELLA: the larger half of each row's magnitudes is kept more often.
        let (mut big, mut big_n, mut small, mut small_n) = (0usize, 0usize, 0usize, 0usize);
        for name in &merged {
            let b = &base[name];
            let d: Vec<f32> = ft[name].iter().zip(b).map(|(x, b)| x - b).collect();
            let median = {
                let mut m: Vec<f32> = d.iter().map(|x| x.abs()).collect();
                m.sort_by(f32::total_cmp);
                m[m.len() / 2]
            };
            for ((g, x), b) in got[name].iter().zip(&d).zip(b) {
                if *x == 0.0 {
                    continue;
                }
                total += 1;
                let on = (g - b).abs() > (x.abs() * 1e-3).max(f32::MIN_POSITIVE);
                if on {
                    kept += 1;
                    let want = (*b as f64 + *x as f64 * r) as f32;
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{method} {name}: {g} vs {want}"
                    );
                }
                if x.abs() > median {
                    big_n += 1;
                    big += on as usize;
                } else {
                    small_n += 1;
                    small += on as usize;
                }
            }
        }
        let frac = kept as f64 / total as f64;
        assert!((frac - 0.4).abs() < 0.01, "{method}: kept {frac}");
        let (fb, fs) = (big as f64 / big_n as f64, small as f64 / small_n as f64);
        if method == "della_linear" {
            assert!(fb > fs + 0.05, "della: big {fb}, small {fs}");
        } else {
            assert!((fb - fs).abs() < 0.02, "dare: big {fb}, small {fs}");
        }
    }
}

const RECIPE_NODES: &str = "  mix:
    merge: ties
    base: base
    inputs:
      - { delta: ft1 }
      - { delta: ft2, weight: WEIGHT }
      - { delta: ft3, weight: 0.5 }
    parameters: { density: 0.5 }
  blend:
    merge: weight_sum
    a: base
    b: ft1
    alpha: 0.3
    seed: SEED
";

fn recipe_text(dir: &Path, weight: &str, seed: &str) -> String {
    let models: String = ["base", "ft1", "ft2", "ft3"]
        .iter()
        .map(|m| format!("  {m}: {{ path: {}/{m}.safetensors }}\n", dir.display()))
        .collect();
    format!(
        "version: 1\nmodels:\n{models}nodes:\n{}",
        RECIPE_NODES.replace("WEIGHT", weight).replace("SEED", seed)
    )
}

#[test]
fn recipes_recompute_only_the_tensors_a_change_reaches() {
    let f = four();
    let path = f.dir.path().join("r.yaml");
    let cache = Cache::new(&f.dir.path().join("cache"));
    let run = |weight: &str, seed: &str| -> BTreeMap<String, (usize, usize)> {
        std::fs::write(&path, recipe_text(f.dir.path(), weight, seed)).unwrap();
        let r = recipe::load(&path).unwrap();
        build::build(&r, &cache, &[], &BuildOptions::default())
            .unwrap()
            .into_iter()
            .map(|n| {
                (
                    n.plan.name.clone(),
                    (n.stored.unwrap_or(0), n.reused.unwrap_or(0)),
                )
            })
            .collect()
    };
    let first = run("1.0", "0");
    let (stored, _) = first["mix"];
    assert!(stored > 1000, "{first:?}");
    // The same values through the CLI give the same tensors.
    let cli = f.dir.path().join("cli.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mergesmith"))
        .args(["merge", "--mode", "ties", "--base"])
        .arg(&f.base)
        .args(
            f.ft.iter()
                .flat_map(|p| ["--delta".as_ref(), p.as_os_str()]),
        )
        .args([
            "--weight",
            "1",
            "--weight",
            "1",
            "--weight",
            "0.5",
            "-p",
            "density=0.5",
            "-o",
        ])
        .arg(&cli)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Seed on a `normal` merge reaches no tensor: the node reruns and refers to every tensor.
    let again = run("1.0", "7");
    assert_eq!(again["blend"].0, 0, "{again:?}");
    assert!(again["blend"].1 > 1000);
    // One block's weight of one input: only that block's merged tensors are recomputed.
    let mut v = vec![1.0; 26];
    v[19] = 0.25; // OUT05: BASE, IN00-IN11, M00, OUT00...
    let vector = format!(
        "[{}]",
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let changed = run(&vector, "7");
    let out05 = {
        let ck = Checkpoint::open(&f.base).unwrap();
        ck.tensors()
            .iter()
            .filter(|t| {
                let class = mergesmith::arch::classify(Family::builtin("sd1"), &t.name);
                t.dtype.is_float() && class.mergeable && class.block.as_deref() == Some("OUT05")
            })
            .count()
    };
    assert!(out05 > 5);
    assert_eq!(changed["mix"].0, out05, "{changed:?}");
    // The stored result of the first build equals the CLI's output tensor by tensor.
    let r = recipe::load(&path).unwrap();
    drop(r);
    let cli_t = tensors(&cli);
    std::fs::write(&path, recipe_text(f.dir.path(), "1.0", "7")).unwrap();
    let saved = f.dir.path().join("saved.safetensors");
    let mut text = recipe_text(f.dir.path(), "1.0", "7");
    text.push_str(&format!(
        "  out:\n    save: mix\n    to: {}\n",
        saved.display()
    ));
    std::fs::write(&path, text).unwrap();
    build::build(
        &recipe::load(&path).unwrap(),
        &cache,
        &[],
        &BuildOptions::default(),
    )
    .unwrap();
    assert_eq!(tensors(&saved), cli_t);
}

fn errors(nodes: &str) -> String {
    let text = format!(
        "version: 1\nmodels:\n  base: {{ path: b.safetensors }}\n  ft1: {{ path: f1.safetensors }}\n  ft2: {{ path: f2.safetensors }}\nnodes:\n{nodes}"
    );
    recipe::parse(Path::new("recipe.yaml"), &text)
        .unwrap_err()
        .render()
}

#[test]
fn list_nodes_report_bad_input_at_its_line() {
    let e = errors("  m:\n    merge: ties\n    base: base\n    inputs:\n      - { delta: ft1 }\n      - { model: ft2 }\n");
    assert!(
        e.contains("ties takes deltas: input 1 is a full model"),
        "{e}"
    );
    assert!(e.contains("recipe.yaml:12:"), "{e}");
    let e = errors("  m:\n    merge: linear\n    inputs:\n      - { model: ft1 }\n      - { delta: ft2, minus: base }\n");
    assert!(e.contains("linear takes full models"), "{e}");
    let e = errors("  m:\n    merge: ties\n    base: base\n    inputs: [{ delta: ft1 }, { delta: ft2 }]\n    parameters: { densty: 0.3 }\n");
    assert!(e.contains("did you mean `density`"), "{e}");
    let e = errors(
        "  m:\n    merge: dare\n    base: base\n    inputs: [{ delta: ft1 }, { delta: ft2 }]\n",
    );
    assert!(e.contains("dare.density: required"), "{e}");
    let e = errors("  m:\n    merge: della\n    base: base\n    inputs: [{ delta: ft1 }]\n    parameters: { density: 0.9, epsilon: 0.15 }\n");
    assert!(e.contains("must stay inside (0, 1)"), "{e}");
    let e = errors(
        "  m:\n    merge: slerp\n    inputs: [{ model: ft1, weight: 0.5 }, { model: ft2 }]\n",
    );
    assert!(
        e.contains("slerp takes no per-input weight; its parameters are t"),
        "{e}"
    );
    let e = errors("  m:\n    merge: slerp\n    inputs: [{ model: ft1 }]\n");
    assert!(e.contains("slerp takes 2 input(s), got 1"), "{e}");
    let e = errors("  m:\n    merge: tis\n    base: base\n");
    assert!(e.contains("did you mean `ties`"), "{e}");
    let e = errors("  m:\n    merge: ties\n    inputs: [{ delta: ft1 }]\n");
    assert!(e.contains("no `base`"), "{e}");
    let e =
        errors("  m:\n    merge: ties\n    base: base\n    a: ft1\n    inputs: [{ delta: ft1 }]\n");
    assert!(e.contains("takes no `a`"), "{e}");
}

#[test]
fn sweeps_set_list_parameters() {
    let text = "version: 1
models:
  base: { path: b.safetensors }
  ft1: { path: f1.safetensors }
  ft2: { path: f2.safetensors }
nodes:
  mix:
    merge: dare_ties
    base: base
    inputs: [{ delta: ft1 }, { delta: ft2 }]
    parameters: { density: 0.5 }
  look:
    generate:
      model: mix
      prompt: a cat
      steps: 2
      width: 64
      height: 48
  sweep:
    xy:
      generate: look
      x: { path: mix.density, values: [0.2, 0.6] }
      y: { path: mix.parameters.seed, values: [1, 2] }
";
    let r = recipe::parse(Path::new("r.yaml"), text).unwrap();
    let mut seen = Vec::new();
    for (name, node) in &r.nodes {
        if let Node::MergeList(n) = node {
            if name != "mix" {
                seen.push(serde_json::to_value(&n.spec.params).unwrap().to_string());
            }
        }
    }
    seen.sort();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen[0].contains("\"density\":0.2") && seen[0].contains("\"seed\":1"),
        "{seen:?}"
    );
    assert!(
        seen[3].contains("\"density\":0.6") && seen[3].contains("\"seed\":2"),
        "{seen:?}"
    );
    let bad = text.replace("values: [0.2, 0.6]", "values: [1.5]");
    let e = recipe::parse(Path::new("r.yaml"), &bad)
        .unwrap_err()
        .render();
    assert!(
        e.contains("dare_ties.density: 1.5 is outside (0, 1]"),
        "{e}"
    );
    let bad = text.replace("path: mix.density", "path: mix.gamma");
    let e = recipe::parse(Path::new("r.yaml"), &bad)
        .unwrap_err()
        .render();
    assert!(e.contains("`gamma` is not a parameter of dare_ties"), "{e}");
    let bad = text.replace(
        "{ path: mix.density, values: [0.2, 0.6] }",
        "{ type: alpha, values: [0.2] }",
    );
    let e = recipe::parse(Path::new("r.yaml"), &bad)
        .unwrap_err()
        .render();
    assert!(
        e.contains("`mix` is a dare_ties merge: sweep its parameters with `path: mix.PARAM`"),
        "{e}"
    );
}

#[test]
fn methods_table_in_readme_is_current() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = doc.find("<!-- methods:begin -->\n").unwrap() + "<!-- methods:begin -->\n".len();
    let end = doc.find("<!-- methods:end -->").unwrap();
    assert!(
        doc[start..end] == mergesmith::merge::method::markdown(),
        "README.md is stale: paste `mergesmith methods` between the methods markers"
    );
}
