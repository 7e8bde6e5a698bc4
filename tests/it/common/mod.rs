//! Helpers shared by the integration tests: raw safetensors files, torch zip checkpoints
//! built opcode by opcode (the way `torch.save` writes them), and synthetic models.
#![allow(dead_code)]

pub mod s3;

/// Recipe nodes most generation tests start from (YAML text, indented as under `nodes:`):
/// `blend`, a 0.5 weight sum of models `a` and `b`, and `look`, a 2-step 64x48 preview of it.
macro_rules! preview_nodes {
    () => {
        "  blend:
    merge: weight_sum
    a: a
    b: b
    alpha: 0.5
  look:
    generate:
      model: blend
      prompt: a cat
      steps: 2
      width: 64
      height: 48
"
    };
}

use std::io::Write;
use std::path::{Path, PathBuf};

use mergesmith::arch::Family;
use mergesmith::dtype::FloatType;
use mergesmith::synth::{Perturb, Size, SynthOptions, SynthVariant};

/// Writes `len(header) | header | data` with no validation at all.
pub fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Options for a fresh tiny model.
pub fn tiny(family: Family, seed: u64) -> SynthOptions {
    SynthOptions {
        family,
        size: Size::Tiny,
        seed,
        dtype: FloatType::Fp16,
        variant: SynthVariant::Standard,
        layout: None,
        ema: false,
        perturb: None,
        copy: None,
    }
}

/// Synthesizes a model into `dir/name`.
pub fn synth(dir: &Path, name: &str, opts: &SynthOptions) -> PathBuf {
    let path = dir.join(name);
    mergesmith::synth::synthesize(opts, &path, false, false).unwrap();
    path
}

/// Runnable small SD1 models (`synth --size small`) `NAME.safetensors` in `dir`, seeds 1, 2, ...
pub fn small_models(dir: &Path, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let mut o = tiny(Family::builtin("sd1"), i as u64 + 1);
        o.size = Size::Small;
        synth(dir, &format!("{name}.safetensors"), &o);
    }
}

/// A tensor for a torch checkpoint: storage bytes, plus the view (offset, size, stride).
pub struct TorchTensor {
    pub name: String,
    pub storage_class: &'static str,
    pub storage: Vec<u8>,
    pub elem_size: usize,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
    pub parameter: bool,
}

/// A minimal pickle (protocol 2) writer emitting the opcodes torch.save uses.
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    pub fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn int(&mut self, v: usize) {
        self.0.push(b'J');
        self.0.extend_from_slice(&(v as i32).to_le_bytes());
    }
    pub fn tuple(&mut self, items: &[usize]) {
        self.0.push(b'(');
        for &i in items {
            self.int(i);
        }
        self.0.push(b't');
    }
    pub fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    pub fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor(&mut self, key: &str, t: &TorchTensor) {
        if t.parameter {
            self.global("torch._utils", "_rebuild_parameter");
            self.op(b'(');
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'(');
        // persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
        self.op(b'(');
        self.str("storage");
        self.global("torch", t.storage_class);
        self.str(key);
        self.str("cpu");
        self.int(t.storage.len() / t.elem_size);
        self.op(b't');
        self.op(b'Q');
        self.int(t.offset);
        self.tuple(&t.size);
        self.tuple(&t.stride);
        self.op(0x89);
        self.empty_ordered_dict();
        self.op(b't');
        self.op(b'R');
        if t.parameter {
            self.op(0x88);
            self.empty_ordered_dict();
            self.op(b't');
            self.op(b'R');
        }
    }
}

/// Writes a torch zip checkpoint: `{"epoch": 1, "state_dict": OrderedDict(tensors)}`
/// when `nested`, else the OrderedDict itself. `extra` adds raw pickle bytes for one more
/// state-dict value under the key `extra` (to test refusals).
pub fn torch_zip(path: &Path, tensors: &[TorchTensor], nested: bool, extra: Option<&[u8]>) {
    torch_zip_under(path, tensors, nested.then_some("state_dict"), extra)
}

/// A torch zip file whose tensors are a dict under `key` of the top-level dict (with an
/// `epoch` entry beside it), or the top-level dict itself.
pub fn torch_zip_under(
    path: &Path,
    tensors: &[TorchTensor],
    key: Option<&str>,
    extra: Option<&[u8]>,
) {
    let nested = key.is_some();
    let mut p = Pickle::new();
    if let Some(key) = key {
        p.op(b'}');
        p.op(b'(');
        p.str("epoch");
        p.int(1);
        p.str(key);
    }
    p.empty_ordered_dict();
    p.op(b'(');
    for (i, t) in tensors.iter().enumerate() {
        p.str(&t.name);
        p.tensor(&i.to_string(), t);
    }
    if let Some(e) = extra {
        p.str("extra");
        p.0.extend_from_slice(e);
    }
    p.op(b'u');
    if nested {
        p.op(b'u');
    }
    p.op(b'.');

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&p.0).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (i, t) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        zip.write_all(&t.storage).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Three related tiny models in a temporary directory: A, and B and C derived from A.
pub struct Models {
    pub dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
    pub c: PathBuf,
}

/// Makes A (seed `seed`) and B, C = A + a perturbation of `strength` and `rank` (seeds
/// `seed + 1`, `seed + 2`), all stored as `dtype`.
pub fn related_models(
    family: Family,
    dtype: FloatType,
    seed: u64,
    strength: f32,
    rank: usize,
) -> Models {
    let dir = tempfile::tempdir().unwrap();
    let opts = |seed: u64| SynthOptions {
        dtype,
        ..tiny(family, seed)
    };
    let a = synth(dir.path(), "a.safetensors", &opts(seed));
    let related = |name: &str, seed: u64| {
        let mut o = opts(seed);
        o.perturb = Some(Perturb {
            base: a.clone(),
            strength,
            rank,
        });
        synth(dir.path(), name, &o)
    };
    let b = related("b.safetensors", seed + 1);
    let c = related("c.safetensors", seed + 2);
    Models { dir, a, b, c }
}

/// Keys and shapes of a layout table of `data/layouts` (full size).
pub fn layout_table(text: &str) -> Vec<(String, Vec<usize>)> {
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let shape = if f[3].is_empty() {
                vec![]
            } else {
                f[3].split('x').map(|d| d.parse().unwrap()).collect()
            };
            (f[1].to_string(), shape)
        })
        .collect()
}

/// Set in the child process that [`run_alone`] starts.
const ALONE: &str = "MERGESMITH_TEST_ALONE";

/// Runs the ignored test `path` (module path inside this binary) by itself in a child process
/// of this test binary, for measurements of process-wide state (I/O counters) that other
/// tests running in parallel threads would disturb; fails when it fails.
pub fn run_alone(path: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            path,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(ALONE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "{path} failed in its own process");
    assert!(
        stdout.contains("1 passed"),
        "{path} did not run in its own process"
    );
}

/// Whether this process is the child of [`run_alone`].
pub fn is_alone() -> bool {
    std::env::var_os(ALONE).is_some()
}

/// A recipe's text: `version: 1`, a model `NAME: { path: DIRNAME.safetensors }` for each
/// name (`dir` ends with `/`, or is empty), then `nodes:` and `nodes` (indented by two).
pub fn recipe_yaml(dir: &str, models: &[&str], nodes: &str) -> String {
    let mut text = String::from("version: 1\nmodels:\n");
    for m in models {
        text.push_str(&format!("  {m}: {{ path: {dir}{m}.safetensors }}\n"));
    }
    text.push_str("nodes:\n");
    text.push_str(nodes);
    text
}
