//! `mergesmith report`: the static site of a built recipe: escaping, link integrity,
//! content-addressed images that are copied once, the per-block model comparison against an
//! f64 reference, and (when Chromium is installed) a headless render.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergesmith::arch::Family;
use mergesmith::build::{self, BuildOptions};
use mergesmith::recipe;
use mergesmith::store::Cache;

const RECIPE: &str = "version: 1
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
  look:
    generate:
      model: blend
      prompt: \"a cat <script>alert('x')</script> & co\"
      steps: 2
      width: 64
      height: 64
  sweep:
    xy:
      generate: look
      x: { type: alpha, values: [0.3, 0.7] }
      y: { type: seed, values: [1, 2] }
";

/// Every `href` / `src` of an HTML page (entities decoded).
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        let mut rest = html;
        while let Some(i) = rest.find(attr) {
            rest = &rest[i + attr.len()..];
            let end = rest.find('"').unwrap();
            out.push(rest[..end].replace("&#x2f;", "/").replace("&amp;", "&"));
            rest = &rest[end..];
        }
    }
    out
}

fn site(dir: &Path) -> (recipe::Recipe, Cache, PathBuf, mergesmith::report::Site) {
    crate::common::small_models(dir, &["a", "b"]);
    let path = dir.join("r.yaml");
    std::fs::write(&path, RECIPE).unwrap();
    let r = recipe::load(&path).unwrap();
    let cache = Cache::new(&dir.join("cache"));
    let reports = build::build(&r, &cache, &[], &BuildOptions::default()).unwrap();
    let out = dir.join("site");
    let s = mergesmith::report::write(&r, &cache, &reports, &out).unwrap();
    (r, cache, out, s)
}

#[test]
fn the_site_escapes_user_text_and_every_link_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let (r, cache, out, s) = site(dir.path());
    assert_eq!(s.pages.len(), 2);
    let mut images = 0;
    for page in &s.pages {
        let html = std::fs::read_to_string(page).unwrap();
        assert!(!html.contains("<script>"), "{}", page.display());
        assert!(html.contains("&lt;script&gt;alert("), "{}", page.display());
        for link in links(&html) {
            assert!(
                !link.starts_with('/') && !link.contains("://"),
                "not relative: {link}"
            );
            let target = page.parent().unwrap().join(&link);
            assert!(
                target.is_file(),
                "{} links to missing {link}",
                page.display()
            );
            images += link.ends_with(".png") as usize;
        }
    }
    // 4 cells + the grid + the swept node's own image, full size and thumbnail.
    assert!(images >= 2 * 6, "{images}");
    let index = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(index.contains("sweep-sweep.html"));
    assert!(index.contains("<svg") && index.contains("blend (merge)"));
    assert!(index.contains("blend: A = a vs B = b"));
    // Publishing again copies nothing: images are named by content key.
    let reports = build::build(&r, &cache, &[], &BuildOptions::default()).unwrap();
    let again = mergesmith::report::write(&r, &cache, &reports, &out).unwrap();
    assert_eq!(again.images_copied, 0);
    assert!(s.images_copied >= 6);
}

#[test]
fn per_block_comparison_matches_an_f64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = crate::common::synth(
        d,
        "a.safetensors",
        &crate::common::tiny(Family::builtin("sd1"), 1),
    );
    let b = crate::common::synth(
        d,
        "b.safetensors",
        &crate::common::tiny(Family::builtin("sd1"), 2),
    );
    let open = |p: &Path| mergesmith::checkpoint::Checkpoint::open(p).unwrap();
    let rows = mergesmith::report::similarity::compare(&open(&a), &open(&b)).unwrap();
    assert_eq!(
        rows.len(),
        26,
        "every SD1 block, BASE being the text encoder"
    );
    // Reference: read both files with the safetensors crate, sum in f64 per block.
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let (ta, tb) = (
        safetensors::SafeTensors::deserialize(&ba).unwrap(),
        safetensors::SafeTensors::deserialize(&bb).unwrap(),
    );
    let f32s = |v: safetensors::tensor::TensorView| -> Vec<f64> {
        v.data()
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect()
    };
    let mut sums: BTreeMap<String, [f64; 4]> = BTreeMap::new();
    for (name, va) in ta.tensors() {
        let unet = name.starts_with("model.diffusion_model.");
        let te = name.starts_with("cond_stage_model.");
        if !(unet || te) || va.dtype() != safetensors::Dtype::F16 {
            continue;
        }
        let block = match unet {
            true => mergesmith::arch::Family::builtin("sd1")
                .block_in(0, &name)
                .unwrap(),
            false => "BASE".to_string(),
        };
        let (x, y) = (f32s(va), f32s(tb.tensor(&name).unwrap()));
        let s = sums.entry(block).or_insert([0.0; 4]);
        for (p, q) in x.iter().zip(&y) {
            s[0] += p * q;
            s[1] += p * p;
            s[2] += q * q;
            s[3] += (p - q) * (p - q);
        }
    }
    for row in &rows {
        let s = sums[&row.block];
        let cosine = s[0] / (s[1] * s[2]).sqrt();
        let distance = (s[3] / s[1]).sqrt();
        assert!(
            (row.cosine - cosine).abs() < 1e-9,
            "{}: {} vs {cosine}",
            row.block,
            row.cosine
        );
        assert!((row.distance - distance).abs() < 1e-9, "{}", row.block);
    }
    // Unrelated random models: near-orthogonal, distance about √2.
    assert!(rows
        .iter()
        .all(|r| r.cosine.abs() < 0.5 && r.distance > 1.0));
    // A model against itself: identical.
    let same = mergesmith::report::similarity::compare(&open(&a), &open(&a)).unwrap();
    assert!(same
        .iter()
        .all(|r| (r.cosine - 1.0).abs() < 1e-12 && r.distance == 0.0));
}

#[test]
fn chromium_renders_the_grid_images_when_installed() {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    let Some(browser) = browser else {
        eprintln!("skipped: no Chromium on this machine (install Debian's `chromium` to run it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_, _, out, _) = site(dir.path());
    let shot = dir.path().join("shot.png");
    let page = format!("file://{}", out.join("sweep-sweep.html").display());
    let status = std::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1000,1400",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page)
        .status()
        .unwrap();
    assert!(status.success());
    let img = image::open(&shot).unwrap().to_rgb8();
    // Something besides the white page was drawn (the grid's cells are noisy colour).
    let colourful = img
        .pixels()
        .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60)
        .count();
    assert!(colourful > 1000, "{colourful} colourful pixels");
}

#[test]
fn a_stored_merge_is_compared_with_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    crate::common::synth(
        d,
        "a.safetensors",
        &crate::common::tiny(Family::builtin("sd1"), 1),
    );
    crate::common::synth(
        d,
        "b.safetensors",
        &crate::common::tiny(Family::builtin("sd1"), 2),
    );
    let path = d.join("r.yaml");
    std::fs::write(
        &path,
        crate::common::recipe_yaml(
            "",
            &["a", "b"],
            "  half:\n    merge: weight_sum\n    a: a\n    b: b\n    alpha: 0.5\n",
        ),
    )
    .unwrap();
    let r = recipe::load(&path).unwrap();
    let cache = Cache::new(&d.join("cache"));
    let reports = build::build(&r, &cache, &[], &BuildOptions::default()).unwrap();
    let keys = reports
        .iter()
        .map(|r| (r.plan.name.as_str(), r.plan.key.as_str()))
        .collect();
    let tables = mergesmith::report::similarity::tables(&r, &cache, &keys).unwrap();
    let titles: Vec<&str> = tables.iter().map(|t| t.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "half: A = a vs B = b",
            "half: a vs the result",
            "half: b vs the result"
        ]
    );
    // The result is (A + B) / 2, so A - result = (A - B) / 2 block by block (f16 rounding
    // of the stored result aside).
    for (ab, ar) in tables[0].rows.iter().zip(&tables[1].rows) {
        assert_eq!(ab.block, ar.block);
        assert!(
            (ar.distance - ab.distance / 2.0).abs() < 2e-3 * ab.distance.max(1.0),
            "{}: {} vs {}",
            ab.block,
            ar.distance,
            ab.distance / 2.0
        );
    }
    mergesmith::report::write(&r, &cache, &reports, &d.join("site")).unwrap();
    let index = std::fs::read_to_string(d.join("site/index.html")).unwrap();
    assert!(index.contains("half: a vs the result"));
}
