//! Flux and SD3 text to image end to end on small synthetic ComfyUI all-in-one checkpoints:
//! reproducible images of the asked size, what changes them and what must not, clear refusals,
//! PNG info, and a recipe that merges two Flux models and previews the merge.
//! (Pixel parity with diffusers on the same weights: `tools/parity_flow.py`, developer-run.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mergesmith::arch::Family;
use mergesmith::checkpoint::Checkpoint;
use mergesmith::gen::job::Job;
use mergesmith::gen::pipeline::Models;
use mergesmith::gen::sampler::{Sampler, ScheduleKind};
use mergesmith::gen::tokenizer::ClipTokenizer;
use mergesmith::synth::{Size, SynthVariant};

/// A small runnable model of `family` (`variant`) as `NAME.safetensors` in `dir`.
fn small(dir: &Path, name: &str, family: &str, variant: SynthVariant, seed: u64) -> PathBuf {
    let mut opts = crate::common::tiny(Family::builtin(family), seed);
    opts.size = Size::Small;
    opts.variant = variant;
    crate::common::synth(dir, &format!("{name}.safetensors"), &opts)
}

fn load(path: &Path) -> Models {
    let ck = Arc::new(Checkpoint::open(path).unwrap());
    Models::load(ck, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap()
}

fn job(cfg: f64) -> Job {
    Job {
        prompt: "a red fox in the snow".into(),
        negative: "blurry".into(),
        steps: 2,
        cfg,
        sampler: Sampler::Euler,
        seed: 3,
        width: Some(32),
        height: Some(48),
        ..Default::default()
    }
}

#[test]
fn flux_dev_and_schnell_generate_reproducible_images() {
    let dir = tempfile::tempdir().unwrap();
    let tok = ClipTokenizer::bundled().unwrap();
    let dev = load(&small(dir.path(), "dev", "flux", SynthVariant::Standard, 1));
    let schnell = load(&small(
        dir.path(),
        "schnell",
        "flux",
        SynthVariant::Schnell,
        1,
    ));
    assert!(dev.takes_guidance() && !schnell.takes_guidance());
    assert_eq!(dev.prediction(), None);
    assert_eq!(dev.native_size(), 1024);
    let base = job(1.0);
    let image = |m: &Models, j: &Job| m.generate_image(&tok, j, 0).unwrap();
    let a = image(&dev, &base);
    assert_eq!(a.len(), 32 * 48 * 3);
    assert_eq!(image(&dev, &base), a, "same job, same bytes");
    // Prompt, seed, guidance, sampler and schedule each change the image.
    let changed = |j: Job| assert_ne!(image(&dev, &j), a, "{j:?}");
    changed(Job {
        prompt: "a blue car".into(),
        ..base.clone()
    });
    changed(Job {
        seed: 4,
        ..base.clone()
    });
    changed(Job {
        guidance: Some(7.0),
        ..base.clone()
    });
    changed(Job {
        sampler: Sampler::DpmPp2m,
        steps: 3,
        ..base.clone()
    });
    changed(Job {
        schedule: Some(ScheduleKind::Karras),
        ..base.clone()
    });
    // cfg 1 runs the prompt alone (ComfyUI's shortcut): the negative prompt does not matter.
    assert_eq!(
        image(
            &dev,
            &Job {
                negative: "something else".into(),
                ..base.clone()
            }
        ),
        a
    );
    // With cfg above 1 it does.
    let cfg = Job {
        cfg: 2.0,
        ..base.clone()
    };
    assert_ne!(image(&dev, &cfg), a);
    // schnell has no guidance embedding: the value is ignored, not silently applied.
    let s = image(&schnell, &base);
    assert_eq!(
        image(
            &schnell,
            &Job {
                guidance: Some(9.0),
                ..base.clone()
            }
        ),
        s
    );
    // fp8 storage (as Flux files often ship) loads, widened: an image of the same size,
    // close to but not the f16 model's (the weights were rounded).
    let mut opts = crate::common::tiny(Family::builtin("flux"), 1);
    opts.size = Size::Small;
    opts.dtype = mergesmith::dtype::FloatType::Fp8E4m3;
    let fp8 = load(&crate::common::synth(dir.path(), "fp8.safetensors", &opts));
    let f = image(&fp8, &base);
    assert_eq!(f.len(), a.len());
    assert_ne!(f, a);
    // Every deterministic sampler runs.
    for sampler in Sampler::ALL {
        let j = Job {
            sampler,
            ..base.clone()
        };
        match sampler.check_flow() {
            Ok(()) => assert_eq!(image(&dev, &j).len(), a.len(), "{sampler:?}"),
            Err(_) => {
                let e = dev.generate_image(&tok, &j, 0).unwrap_err().to_string();
                assert!(e.contains("flow models"), "{e}");
            }
        }
    }
}

#[test]
fn sd3_generates_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let tok = ClipTokenizer::bundled().unwrap();
    let sd3 = load(&small(dir.path(), "sd3", "sd3", SynthVariant::Standard, 2));
    assert!(!sd3.takes_guidance());
    let base = job(4.5);
    let a = sd3.generate_image(&tok, &base, 0).unwrap();
    assert_eq!(a.len(), 32 * 48 * 3);
    assert_eq!(sd3.generate_image(&tok, &base, 0).unwrap(), a);
    // SD3 uses the negative prompt through CFG.
    let neg = Job {
        negative: "sharp".into(),
        ..base.clone()
    };
    assert_ne!(sd3.generate_image(&tok, &neg, 0).unwrap(), a);
    let refused = |j: Job, says: &str| {
        let e = sd3.generate_image(&tok, &j, 0).unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    };
    refused(
        Job {
            width: Some(40),
            ..base.clone()
        },
        "multiple of 16",
    );
    refused(
        Job {
            sampler: Sampler::EulerA,
            ..base.clone()
        },
        "does not run on flow models",
    );
    refused(
        Job {
            hires: Some(mergesmith::gen::png::Hires {
                scale: 1.5,
                steps: 1,
                strength: 0.5,
            }),
            ..base.clone()
        },
        "hires fix",
    );
    refused(
        Job {
            prediction: Some(mergesmith::gen::pipeline::Prediction::V),
            ..base.clone()
        },
        "prediction",
    );
}

#[test]
fn a_bare_transformer_or_a_fill_model_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = crate::common::tiny(Family::builtin("flux"), 1);
    opts.size = Size::Small;
    opts.layout = Some("bfl".into());
    let bare = crate::common::synth(dir.path(), "bare.safetensors", &opts);
    let fill = small(dir.path(), "fill", "flux", SynthVariant::Fill, 1);
    let err = |p: &Path| {
        let ck = Arc::new(Checkpoint::open(p).unwrap());
        match Models::load(ck, &candle_core::Device::Cpu, candle_core::DType::F32) {
            Ok(_) => panic!("{} loaded", p.display()),
            Err(e) => e.to_string(),
        }
    };
    let e = err(&bare);
    assert!(e.contains("T5-XXL"), "{e}");
    let e = err(&fill);
    assert!(e.contains("Fill"), "{e}");
}

#[test]
fn cli_gen_writes_flux_pngs_with_the_distilled_guidance_whatever_the_threads() {
    let dir = tempfile::tempdir().unwrap();
    let model = small(dir.path(), "small-flux", "flux", SynthVariant::Standard, 5);
    let run = |threads: &str| {
        let out = dir.path().join(format!("fox-{threads}.png"));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_mergesmith"))
            .args(["gen", "-m", model.to_str().unwrap(), "-p", "a red fox"])
            .args(["--steps", "2", "--sampler", "euler", "--cfg", "1"])
            .args(["--width", "32", "--height", "32", "--seed", "9"])
            .args(["--guidance", "4", "-o", out.to_str().unwrap()])
            .env("MERGESMITH_CACHE", dir.path().join("cache"))
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        std::fs::read(&out).unwrap()
    };
    let bytes = run("1");
    assert_eq!(run("4"), bytes, "same bytes whatever the thread count");
    let text: BTreeMap<String, String> = mergesmith::gen::png::read_text(&bytes)
        .unwrap()
        .into_iter()
        .collect();
    let p = &text["parameters"];
    assert!(
        p.starts_with(
            "a red fox\nSteps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 4, Seed: 9, Size: 32x32"
        ),
        "{p}"
    );
}

const FLUX_RECIPE: &str = "version: 1
models:
  a: { path: a.safetensors }
  b: { path: b.safetensors }
nodes:
  blend:
    merge: weight_sum
    a: a
    b: b
    alpha: 0.5
    cache: memory
  preview:
    generate:
      model: blend
      prompt: a red fox
      steps: 2
      cfg: 1
      guidance: 3.5
      sampler: euler
      schedule: simple
      seed: 1
      width: 32
      height: 32
    to: out
  sweep:
    xy:
      generate: preview
      x: { type: guidance, values: [2, 5] }
      y: { type: alpha, values: [0.2, 0.8] }
    to: grids
";

#[test]
fn a_recipe_previews_a_flux_merge() {
    use mergesmith::build::{self, BuildOptions};
    use mergesmith::store::Cache;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    small(d, "a", "flux", SynthVariant::Standard, 1);
    small(d, "b", "flux", SynthVariant::Standard, 2);
    let recipe = d.join("recipe.yaml");
    std::fs::write(&recipe, FLUX_RECIPE).unwrap();
    let recipe = mergesmith::recipe::load(&recipe).unwrap();
    build::build(
        &recipe,
        &Cache::new(&d.join("cache")),
        &[],
        &BuildOptions::default(),
    )
    .unwrap();
    let png = d.join("out").join("preview-1.png");
    let first = std::fs::read(&png).unwrap();
    // The guidance × alpha grid: four different cells.
    let grid = std::fs::read_dir(d.join("grids")).unwrap().count();
    assert!(grid >= 1);
    let cells: Vec<_> = recipe
        .nodes
        .iter()
        .filter_map(|(n, node)| match node {
            mergesmith::nodes::Node::Generate(g) if n.starts_with("sweep.") => {
                Some((g.job.guidance, n.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(cells.len(), 4, "{cells:?}");
    assert!(cells.iter().any(|c| c.0 == Some(2.0)) && cells.iter().any(|c| c.0 == Some(5.0)));
    // A fresh cache makes the same bytes.
    std::fs::remove_dir_all(d.join("out")).unwrap();
    build::build(
        &recipe,
        &Cache::new(&d.join("cache2")),
        &[],
        &BuildOptions::default(),
    )
    .unwrap();
    assert_eq!(std::fs::read(&png).unwrap(), first);
    // A sampler flow models cannot run fails the node, naming what runs.
    let bad = FLUX_RECIPE
        .replace("sampler: euler", "sampler: dpmpp_2m_sde")
        .split("  sweep:")
        .next()
        .unwrap()
        .to_string();
    std::fs::write(d.join("bad.yaml"), bad).unwrap();
    let recipe = mergesmith::recipe::load(&d.join("bad.yaml")).unwrap();
    let e = build::build(
        &recipe,
        &Cache::new(&d.join("cache3")),
        &[],
        &BuildOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("flow models"), "{e}");
}

/// Writes the tensors of `from` whose keys start with `prefix` to `to`, the prefix removed (a
/// bare transformer, ComfyUI's `clip_l.safetensors`, `t5xxl.safetensors`, BFL's `ae.safetensors`).
fn split_out(from: &Path, prefix: &str, to: &Path) -> PathBuf {
    use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
    let ck = Checkpoint::open(from).unwrap();
    let picked: Vec<_> = ck
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(prefix))
        .collect();
    let specs = picked
        .iter()
        .map(|t| TensorSpec {
            name: t.name[prefix.len()..].to_string(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    let w = SafetensorsWriter::create(to, specs, &BTreeMap::new(), true).unwrap();
    for t in picked {
        w.write(&t.name[prefix.len()..], &ck.data(t)).unwrap();
    }
    w.finish().unwrap();
    to.to_path_buf()
}

#[test]
fn a_bare_transformer_with_text_encoder_and_vae_files_makes_the_all_in_one_image() {
    use mergesmith::gen::job::{ComponentFile, Components};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tok = ClipTokenizer::bundled().unwrap();
    let aio = small(d, "aio", "flux", SynthVariant::Standard, 6);
    let bare = split_out(
        &aio,
        "model.diffusion_model.",
        &d.join("flux1-dev.safetensors"),
    );
    let clip = split_out(
        &aio,
        "text_encoders.clip_l.transformer.",
        &d.join("clip_l.safetensors"),
    );
    let t5 = split_out(
        &aio,
        "text_encoders.t5xxl.transformer.",
        &d.join("t5xxl.safetensors"),
    );
    let ae = split_out(&aio, "vae.", &d.join("ae.safetensors"));
    let want = load(&aio).generate_image(&tok, &job(1.0), 0).unwrap();
    let open = |p: &Path| ComponentFile::open(p).unwrap();
    let components = Components {
        // Any order: each file is recognised by its tensors.
        files: vec![open(&t5), open(&ae), open(&clip)],
    };
    let with = |c: &Components| {
        let ck = Arc::new(Checkpoint::open(&bare).unwrap());
        Models::load_with(
            ck,
            c,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
            mergesmith::gen::bf16::Precision::F32,
        )
    };
    let got = with(&components)
        .unwrap()
        .generate_image(&tok, &job(1.0), 0)
        .unwrap();
    assert_eq!(got, want);
    // Without the T5 file the transformer alone cannot run, and says what is missing.
    let e = match with(&Components {
        files: vec![open(&clip), open(&ae)],
    }) {
        Ok(_) => panic!("loaded without T5"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("T5-XXL") && e.contains("--text-encoder"), "{e}");
    // A file that is none of them is named.
    let e = match with(&Components {
        files: vec![open(&bare)],
    }) {
        Ok(_) => panic!("loaded a transformer as a text encoder"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("not a CLIP, T5 or VAE file"), "{e}");
}

/// Deterministic small values (a hash of the name and index), as f32 bytes.
fn values(name: &str, n: usize, scale: f32, offset: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let h = blake3::hash(format!("{name}/{i}").as_bytes());
            let u =
                u32::from_le_bytes(h.as_bytes()[..4].try_into().unwrap()) as f32 / u32::MAX as f32;
            ((u * 2.0 - 1.0) * scale + offset).to_le_bytes()
        })
        .collect()
}

/// SD3.5 Medium's shape on a small SD3 file: MMDiT-X blocks (a second self-attention and
/// 9-way modulation in the image stream of the first `x_blocks` blocks) and RMS q/k norms in
/// every attention, as SD3.5 Medium and Large have (the last block's text stream's too, unless
/// `!last_norms`).
fn sd35_medium(from: &Path, to: &Path, x_blocks: usize, last_norms: bool) -> PathBuf {
    use mergesmith::checkpoint::writer::{SafetensorsWriter, TensorSpec};
    use mergesmith::dtype::DType;
    let ck = Checkpoint::open(from).unwrap();
    let p = "model.diffusion_model.";
    let hidden = ck.get(&format!("{p}x_embedder.proj.weight")).unwrap().shape[0];
    let depth = ck
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with("x_block.attn.qkv.weight"))
        .count();
    let head = hidden / depth;
    let mut added: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
        let n = shape.iter().product();
        let v = values(&name, n, scale, offset);
        added.push((name, shape, v));
    };
    for b in 0..depth {
        for stream in ["x_block", "context_block"] {
            if stream == "context_block" && b == depth - 1 && !last_norms {
                continue;
            }
            for n in ["ln_q", "ln_k"] {
                add(
                    format!("{p}joint_blocks.{b}.{stream}.attn.{n}.weight"),
                    vec![head],
                    0.05,
                    1.0,
                );
            }
        }
        if b < x_blocks {
            let a2 = format!("{p}joint_blocks.{b}.x_block.attn2.");
            let w = 1.0 / (hidden as f32).sqrt();
            add(format!("{a2}qkv.weight"), vec![3 * hidden, hidden], w, 0.0);
            add(format!("{a2}qkv.bias"), vec![3 * hidden], 0.02, 0.0);
            add(format!("{a2}proj.weight"), vec![hidden, hidden], w, 0.0);
            add(format!("{a2}proj.bias"), vec![hidden], 0.02, 0.0);
            for n in ["ln_q", "ln_k"] {
                add(format!("{a2}{n}.weight"), vec![head], 0.05, 1.0);
            }
            let m = format!("{p}joint_blocks.{b}.x_block.adaLN_modulation.1.");
            add(format!("{m}weight"), vec![9 * hidden, hidden], w, 0.0);
            add(format!("{m}bias"), vec![9 * hidden], 0.02, 0.0);
        }
    }
    let replaced: std::collections::BTreeSet<&str> = added.iter().map(|a| a.0.as_str()).collect();
    let kept: Vec<_> = ck
        .tensors()
        .iter()
        .filter(|t| !replaced.contains(t.name.as_str()))
        .collect();
    let mut specs: Vec<TensorSpec> = kept
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    specs.extend(added.iter().map(|(n, s, _)| TensorSpec {
        name: n.clone(),
        dtype: DType::F32,
        shape: s.clone(),
    }));
    let w = SafetensorsWriter::create(to, specs, &BTreeMap::new(), true).unwrap();
    for t in kept {
        w.write(&t.name, &ck.data(t)).unwrap();
    }
    for (n, _, v) in &added {
        w.write(n, v).unwrap();
    }
    w.finish().unwrap();
    to.to_path_buf()
}

#[test]
fn sd35_medium_mmdit_x_blocks_and_qk_norms_generate() {
    let dir = tempfile::tempdir().unwrap();
    let tok = ClipTokenizer::bundled().unwrap();
    let sd3 = small(dir.path(), "sd3", "sd3", SynthVariant::Standard, 2);
    let sd35 = sd35_medium(&sd3, &dir.path().join("sd35m.safetensors"), 3, true);
    let arch = mergesmith::arch::detect(Checkpoint::open(&sd35).unwrap().tensors());
    assert_eq!(arch.variant.id, "sd35_medium");
    let base = job(4.5);
    let a = load(&sd35).generate_image(&tok, &base, 0).unwrap();
    assert_eq!(a.len(), 32 * 48 * 3);
    // The extra attention and the norms are used: not SD3's image.
    assert_ne!(a, load(&sd3).generate_image(&tok, &base, 0).unwrap());
    // The last block's text-stream q/k norms are applied too (candle's own MMDiT drops them;
    // diffusers, ComfyUI and SAI's code apply them).
    let without = sd35_medium(&sd3, &dir.path().join("nolast.safetensors"), 3, false);
    assert_ne!(a, load(&without).generate_image(&tok, &base, 0).unwrap());
}
