//! `generate: {model, prompt, ...}`: images generated from a checkpoint (the web UI's
//! txt2img settings), cached by image key; `to: DIR` also writes them there.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use super::decl::NodeDecl;
use super::images;
use super::{preimage_value, InputKey};
use super::{
    CheckCx, Header, Input, KeyCx, Kind, Makes, Node, NodeKind, Outcome, ParseCx, RunCx, Want,
};
use crate::error::{Error, Result};
use crate::gen::job::Job;
use crate::store::remote::Kind as Stored;

/// The `generate` kind.
pub static KIND: Kind = Kind {
    name: "generate",
    usage: "`generate: {model, prompt}`",
    fields: &["to", "overwrite"],
    hint: Some("options go under `generate:`"),
    makes: Makes::Images,
    declared: |d| d.generate.is_some(),
    parse,
};

/// A `generate` node's parameters (the web UI's txt2img settings).
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateDecl {
    /// The checkpoint: a model or node.
    #[schemars(with = "String")]
    pub model: Spanned<String>,
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    #[serde(default)]
    pub negative: String,
    /// Sampling steps (default 20).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub steps: Option<Spanned<usize>>,
    /// Guidance scale (default 7).
    #[serde(default)]
    pub cfg: Option<f64>,
    /// Sampler (default euler_a): A1111's and ComfyUI's names (euler, euler_a, heun, dpm_2,
    /// lms, dpmpp_2s_a, dpmpp_2m, dpmpp_sde, dpmpp_2m_sde, ddim).
    #[serde(default)]
    pub sampler: Option<crate::gen::sampler::Sampler>,
    /// Schedule (default: the sampler's, as A1111's "Automatic"): normal, karras,
    /// exponential, sgm_uniform, simple, beta, ddim_uniform.
    #[serde(default)]
    pub schedule: Option<crate::gen::sampler::ScheduleKind>,
    /// Noise source (default cpu): cpu (torch's CPU generator, A1111's "CPU"), nv (A1111's
    /// "NV"), comfyui (torch's CPU generator the way ComfyUI draws batches and step noise).
    #[serde(default)]
    pub noise: Option<crate::gen::noise::NoiseSource>,
    /// Prompt syntax (default a1111): a1111 (weights, mean restored), no_norm, none (syntax
    /// read, nothing weighted), comfyui (ComfyUI's reading and weighting).
    #[serde(default)]
    pub emphasis: Option<crate::gen::prompt::Emphasis>,
    /// Textual-inversion embeddings (.safetensors, .pt): prompts name each by its file stem,
    /// as in A1111's embeddings folder.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub embeddings: Vec<Spanned<String>>,
    /// Seed of the first image (default 0; -1: a random one, written in the PNG info).
    #[serde(default)]
    #[schemars(with = "Option<i64>")]
    pub seed: Option<Spanned<i64>>,
    /// Images, of seeds seed, seed + 1, ... (default 1).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub batch: Option<Spanned<usize>>,
    /// Width in pixels, a multiple of 8 (default: the model's native size).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub width: Option<Spanned<usize>>,
    /// Height in pixels, a multiple of 8 (default: the width).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub height: Option<Spanned<usize>>,
    /// CLIP skip (SD1; default 1).
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub clip_skip: Option<Spanned<usize>>,
    /// Hires fix: `{scale, steps, strength}`.
    #[serde(default)]
    #[schemars(with = "Option<crate::gen::png::Hires>")]
    pub hires: Option<Spanned<crate::gen::png::Hires>>,
    /// What the model predicts: epsilon or v (default: guessed from the file).
    #[serde(default)]
    pub prediction: Option<crate::gen::pipeline::Prediction>,
    /// Flux dev's distilled guidance (default 3.5; ignored by models without one).
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Text-encoder files for a Flux or SD3 model (CLIP-L, CLIP-G, T5-XXL in any order, as
    /// ComfyUI's CLIP loaders take them), replacing the checkpoint's: for a bare transformer.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub text_encoders: Vec<Spanned<String>>,
    /// A VAE file for a Flux or SD3 model (Flux's `ae.safetensors`), replacing the
    /// checkpoint's.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub vae: Option<Spanned<String>>,
    /// The CPU's arithmetic (default f32): bf16 runs SD1 / SD2 / SDXL's U-Net and VAE products
    /// with bf16 operands accumulated in f32 on AMX (Intel Xeon 4th generation and later),
    /// about twice as fast; images differ from f32's by a few 255ths and have keys of their own.
    #[serde(default)]
    pub precision: Option<crate::gen::bf16::Precision>,
}

/// Images generated from a checkpoint.
#[derive(Debug, Clone)]
pub struct GenerateNode {
    /// The checkpoint.
    pub model: Input,
    /// What to generate.
    pub job: Job,
    /// A directory the images are also written to (absolute), as `NODE-SEED.png`.
    pub to: Option<PathBuf>,
    /// Replace files there that mergesmith did not write.
    pub overwrite: bool,
    /// The LoRAs its prompt's `<lora:NAME:W>` tags name (the tags are out of the prompt); the
    /// recipe bakes them into the model through a `NODE.loras` node.
    pub loras: Vec<super::LoraUse>,
}

fn parse(_name: &str, decl: &Spanned<NodeDecl>, cx: &mut dyn ParseCx) -> Option<Node> {
    let d = &decl.value;
    let g = d.generate.as_ref()?;
    let v = &g.value;
    let model = cx.resolve(&v.model, Want::Checkpoint);
    let mut ok = true;
    let mut check = |field: &Option<Spanned<usize>>, good: fn(usize) -> bool, what: &str| {
        if let Some(f) = field.as_ref().filter(|f| !good(f.value)) {
            cx.error(&f.referenced, format!("{} is not {what}", f.value), None);
            ok = false;
        }
    };
    let positive = |n: usize| n >= 1;
    check(&v.steps, positive, "a number of steps (at least 1)");
    check(&v.batch, positive, "a batch size (at least 1)");
    check(&v.clip_skip, positive, "a clip skip (at least 1)");
    for size in [&v.width, &v.height] {
        check(
            size,
            |n| n > 0 && n % 8 == 0,
            "an image size (a multiple of 8)",
        );
    }
    if let Some(h) = &v.hires {
        let (scale, strength) = (h.value.scale, h.value.strength);
        if !(1.0..=8.0).contains(&scale) {
            cx.error(
                &h.referenced,
                format!("hires scale {scale} is outside 1..=8"),
                None,
            );
            ok = false;
        }
        if !(strength > 0.0 && strength <= 1.0) {
            cx.error(
                &h.referenced,
                format!("hires strength {strength} is outside (0, 1]"),
                None,
            );
            ok = false;
        }
    }
    if v.guidance.is_some_and(|c| !c.is_finite()) {
        cx.error(
            &g.referenced,
            "guidance must be a finite number".into(),
            None,
        );
        ok = false;
    }
    if v.cfg.is_some_and(|c| !c.is_finite()) {
        cx.error(&g.referenced, "cfg must be a finite number".into(), None);
        ok = false;
    }
    let seed = match v
        .seed
        .as_ref()
        .map(|s| (s, crate::gen::noise::resolve_seed(s.value)))
    {
        None => None,
        Some((_, Ok(seed))) => Some(seed),
        Some((s, Err(e))) => {
            cx.error(&s.referenced, e, None);
            ok = false;
            None
        }
    };
    let sampler = v.sampler.unwrap_or(Job::default().sampler);
    if let Err(e) = sampler.check_schedule(v.schedule) {
        cx.error(&g.referenced, e.to_string(), None);
        ok = false;
    }
    let emphasis = v.emphasis.unwrap_or_default();
    let (prompt, loras) = tag_loras(&v.prompt, &g.referenced, cx);
    ok &= loras.is_some();
    for (what, text) in [("prompt", &prompt), ("negative", &v.negative)] {
        if let Err(e) = crate::gen::prompt::parse(text, emphasis) {
            cx.error(&g.referenced, format!("{what}: {e}"), None);
            ok = false;
        }
    }
    let mut embeddings = Vec::new();
    for e in &v.embeddings {
        match crate::gen::embedding::EmbeddingFile::open(&cx.path(&e.value)) {
            Ok(f) => embeddings.push(f),
            Err(err) => {
                cx.error(&e.referenced, err.to_string(), None);
                ok = false;
            }
        }
    }
    let mut components = crate::gen::job::Components::default();
    for f in v.text_encoders.iter().chain(&v.vae) {
        match crate::gen::job::ComponentFile::open(&cx.path(&f.value)) {
            Ok(file) => components.files.push(file),
            Err(err) => {
                cx.error(&f.referenced, err.to_string(), None);
                ok = false;
            }
        }
    }
    let defaults = Job::default();
    let value = |f: &Option<Spanned<usize>>| f.as_ref().map(|f| f.value);
    let job = Job {
        prompt,
        negative: v.negative.clone(),
        steps: value(&v.steps).unwrap_or(defaults.steps),
        cfg: v.cfg.unwrap_or(defaults.cfg),
        sampler,
        schedule: v.schedule,
        noise: v.noise.unwrap_or(defaults.noise),
        emphasis: v.emphasis.unwrap_or(defaults.emphasis),
        embeddings,
        seed: seed.unwrap_or(defaults.seed),
        batch: value(&v.batch).unwrap_or(defaults.batch),
        width: value(&v.width),
        height: value(&v.height),
        clip_skip: value(&v.clip_skip).unwrap_or(defaults.clip_skip),
        hires: v.hires.as_ref().map(|h| h.value.clone()),
        prediction: v.prediction,
        guidance: v.guidance,
        components,
        precision: v.precision.unwrap_or(defaults.precision),
    };
    let model = model?;
    ok.then_some(Node::Generate(GenerateNode {
        model,
        job,
        to: d.to.as_ref().map(|t| cx.path(t)),
        overwrite: d.overwrite,
        loras: loras.unwrap_or_default(),
    }))
}

/// The prompt without its `<lora:NAME:W>` tags (A1111's syntax: `<lora:NAME>`,
/// `<lora:NAME:W>`, `<lora:NAME:TE:UNET>` with equal strengths, `te=`, `unet=`, and the LBW
/// extension's `lbw=BLOCKS`), and the recipe LoRAs they name; `None` after an error.
fn tag_loras(
    prompt: &str,
    at: &serde_saphyr::Location,
    cx: &mut dyn ParseCx,
) -> (String, Option<Vec<super::LoraUse>>) {
    let (text, tags) = crate::gen::prompt::extra_networks(prompt);
    if tags.is_empty() {
        return (prompt.to_string(), Some(Vec::new()));
    }
    let mut out = Vec::new();
    let mut ok = true;
    for tag in tags {
        let fail = |cx: &mut dyn ParseCx, m: String| {
            cx.error(
                at,
                format!("prompt tag `<{}:{}>`: {m}", tag.kind, tag.name),
                None,
            );
            false
        };
        if tag.kind != "lora" && tag.kind != "lyco" {
            ok &= fail(
                cx,
                format!(
                    "`{}` networks are not supported (LoRA and LyCORIS are)",
                    tag.kind
                ),
            );
            continue;
        }
        let number = |v: &str| v.parse::<f64>().ok().filter(|x| x.is_finite());
        let named = |k: &str| {
            tag.named
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        let te = named("te").or(tag.positional.first().map(String::as_str));
        let unet = named("unet")
            .or(tag.positional.get(1).map(String::as_str))
            .or(te);
        let (te, unet) = match (te.map(number), unet.map(number)) {
            (None, None) => (1.0, 1.0),
            (Some(Some(t)), Some(Some(u))) => (t, u),
            (Some(Some(t)), None) => (t, t),
            _ => {
                ok &= fail(cx, "a strength is a number".into());
                continue;
            }
        };
        if te != unet {
            ok &= fail(
                cx,
                format!("text-encoder strength {te} and U-Net strength {unet} differ; one strength bakes both"),
            );
            continue;
        }
        if let Some((k, _)) = tag
            .named
            .iter()
            .find(|(k, _)| !matches!(k.as_str(), "te" | "unet" | "lbw"))
        {
            ok &= fail(cx, format!("`{k}=` is not an option here (te, unet, lbw)"));
            continue;
        }
        let name = Spanned {
            value: tag.name.clone(),
            referenced: *at,
            defined: *at,
        };
        match cx.resolve(&name, super::Want::Lora) {
            Some(source) => out.push(super::LoraUse {
                source,
                strength: te,
                blocks: named("lbw").map(str::to_string),
            }),
            None => ok = false,
        }
    }
    (text, ok.then_some(out))
}

/// What a generate node's key is computed from: every image's key, and the files it writes.
#[derive(serde::Serialize)]
struct Preimage<'a> {
    op: &'static str,
    version: u32,
    model: InputKey<'a>,
    tokenizer: &'a str,
    job: &'a Job,
    images: Vec<Image<'a>>,
    outputs: Vec<images::Output<'a>>,
}

/// One image of a generate node: its seed and key.
#[derive(serde::Serialize)]
struct Image<'a> {
    seed: u64,
    key: &'a str,
}

impl NodeKind for GenerateNode {
    fn kind(&self) -> &'static Kind {
        &KIND
    }

    fn node_inputs(&self) -> Vec<&str> {
        self.model.node().into_iter().collect()
    }

    fn reads(&self) -> Vec<&str> {
        vec![self.model.name()]
    }

    fn rename_inputs(&mut self, f: &dyn Fn(&str) -> String) {
        self.model.rename(f);
    }

    fn uses_tokenizer(&self) -> bool {
        true
    }

    fn preimage(&self, name: &str, cx: &KeyCx) -> Value {
        let content = cx.content(&self.model);
        let images: Vec<(u64, String)> = self
            .job
            .seeds()
            .map(|seed| (seed, self.job.image_key(&content, cx.tokenizer, seed)))
            .collect();
        preimage_value(Preimage {
            op: "generate",
            version: crate::gen::job::VERSION,
            model: cx.input(&self.model),
            tokenizer: cx.tokenizer,
            job: &self.job,
            images: images
                .iter()
                .map(|(seed, key)| Image { seed: *seed, key })
                .collect(),
            outputs: images
                .iter()
                .map(|(seed, key)| images::Output {
                    file: images::file_name(name, *seed),
                    key,
                })
                .collect(),
        })
    }

    fn check(&self, cx: &CheckCx) -> Result<Option<Header>> {
        let ck = (cx.open)(&self.model)?;
        crate::gen::pipeline::check_arch(&crate::arch::detect(ck.tensors()))
            .map_err(|e| Error::Invalid(format!("{}: {e}", ck.path().display())))?;
        Ok(Some(Vec::new()))
    }

    fn copies_to(&self) -> Option<&Path> {
        self.to.as_deref()
    }

    /// Makes the images the cache lacks, copies them to `to`.
    fn run(&self, name: &str, _key: &str, preimage: &Value, cx: &RunCx) -> Result<Outcome> {
        let cache = cx.store.cache;
        let images = images::image_keys(preimage);
        let missing: Vec<&(u64, String)> = images
            .iter()
            .filter(|(_, key)| !cache.has_image(key))
            .collect();
        if !missing.is_empty() {
            let (models, label, autov2) = cx.models_for(&self.model, &self.job)?;
            let tok = cx.tokenizer()?;
            // Images made of those missing, and the sampling steps of the current one.
            let bar = crate::progress::count(missing.len() as u64, name, cx.run.progress);
            let steps = crate::progress::show_steps(&bar, name);
            for (seed, key) in &missing {
                steps.restart();
                let path = cache.image_path(key);
                self.job
                    .write_image(&models, &tok, *seed, key, (&label, &autov2), &path, true)?;
                cache.publish(key, Stored::Image);
                bar.inc(1);
            }
            bar.finish_and_clear();
        }
        cx.copy_outputs(self.to.as_deref(), self.overwrite, preimage)?;
        Ok(Outcome {
            stored: Some(missing.len()),
            reused: Some(images.len() - missing.len()),
            output: self.to.clone(),
        })
    }

    /// One 512x512 sampling step is about 0.05 of a merge.
    fn summary(&self) -> String {
        format!("{} image(s)", self.job.batch)
    }

    fn cost(&self) -> f64 {
        let job = &self.job;
        let w = job.width.unwrap_or(512) as f64;
        let h = job.height.or(job.width).unwrap_or(512) as f64;
        // Hires steps 0 means as many as the first pass.
        let hires = job.hires.as_ref().map_or(0, |h| match h.steps {
            0 => job.steps,
            n => n as usize,
        });
        let steps = job.steps + hires;
        job.batch as f64 * steps as f64 * w * h / (512.0 * 512.0) * 0.05
    }

    fn describe(&self, made: usize, found: usize) -> String {
        format!("{made} images made, {found} found in the cache")
    }

    fn generation(&self) -> Option<(&Input, &Job)> {
        Some((&self.model, &self.job))
    }
}
