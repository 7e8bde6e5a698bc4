//! PyTorch zip checkpoints: read without executing anything, plain tensors only.

use crate::common::*;
use mergesmith::checkpoint::{Checkpoint, Format};
use mergesmith::dtype::DType;
use mergesmith::error::Error;

fn f16_storage(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

fn sample() -> Vec<TorchTensor> {
    vec![
        TorchTensor {
            name: "model.diffusion_model.out.2.bias".into(),
            storage_class: "FloatStorage",
            storage: f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            elem_size: 4,
            offset: 0,
            size: vec![4],
            stride: vec![1],
            parameter: false,
        },
        // A transposed view of a 2x3 storage: must be gathered, not read as-is.
        TorchTensor {
            name: "transposed".into(),
            storage_class: "FloatStorage",
            storage: f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            elem_size: 4,
            offset: 0,
            size: vec![3, 2],
            stride: vec![1, 3],
            parameter: false,
        },
        // A view with a storage offset, wrapped as an nn.Parameter.
        TorchTensor {
            name: "half_param".into(),
            storage_class: "HalfStorage",
            storage: f16_storage(&[9.0, 9.0, 0.5, 1.5]),
            elem_size: 2,
            offset: 2,
            size: vec![2],
            stride: vec![1],
            parameter: true,
        },
        TorchTensor {
            name: "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
            storage_class: "LongStorage",
            storage: [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
            elem_size: 8,
            offset: 0,
            size: vec![1, 3],
            stride: vec![3, 1],
            parameter: false,
        },
    ]
}

fn check(ck: &Checkpoint) {
    assert_eq!(ck.format(), Format::TorchZip);
    assert_eq!(ck.tensors().len(), 4);
    let f32s = |name: &str| -> Vec<f32> {
        let v = ck.view(name).unwrap();
        v.data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(
        f32s("model.diffusion_model.out.2.bias"),
        vec![1.0, 2.0, 3.0, 4.0]
    );
    let t = ck.view("transposed").unwrap();
    assert_eq!(t.shape, &[3, 2]);
    assert_eq!(f32s("transposed"), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    let h = ck.view("half_param").unwrap();
    assert_eq!(h.dtype, DType::F16);
    assert_eq!(h.data.as_ref(), &f16_storage(&[0.5, 1.5])[..]);
    let ids = ck
        .view("cond_stage_model.transformer.text_model.embeddings.position_ids")
        .unwrap();
    assert_eq!(ids.dtype, DType::I64);
    assert_eq!(ids.data.len(), 24);
}

#[test]
fn reads_flat_and_nested_state_dicts() {
    let dir = tempfile::tempdir().unwrap();
    for nested in [false, true] {
        let path = dir.path().join(format!("m{nested}.ckpt"));
        torch_zip(&path, &sample(), nested, None);
        check(&Checkpoint::open(&path).unwrap());
    }
}

#[test]
fn refuses_non_tensor_values_in_the_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.ckpt");
    // "extra": os.system("echo pwned") -- an inert call object, never executed.
    let mut p = Pickle(Vec::new());
    p.global("os", "system");
    p.op(b'(');
    p.str("echo pwned");
    p.op(b't');
    p.op(b'R');
    torch_zip(&path, &sample(), true, Some(&p.0));
    let err = Checkpoint::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Pickle { .. }));
    assert!(
        msg.contains("`extra`") && msg.contains("os.system") && msg.contains("m.ckpt"),
        "{msg}"
    );
}

#[test]
fn rejects_garbage_and_views_outside_storage() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = sample();
    bad[0].size = vec![5]; // 5 floats from a 4-float storage
    let path = dir.path().join("oob.ckpt");
    torch_zip(&path, &bad, false, None);
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(msg.contains("past the end of its storage"), "{msg}");

    // A zip whose pickle is cut short.
    let path = dir.path().join("cut.ckpt");
    torch_zip(&path, &sample(), false, None);
    let mut bytes = std::fs::read(&path).unwrap();
    let start = bytes
        .windows(14)
        .position(|w| w == b"\x80\x02ccollections")
        .unwrap();
    // Overwrite part of the opcode stream with an opcode mergesmith does not know.
    for b in &mut bytes[start + 40..start + 56] {
        *b = 0xEE;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(Checkpoint::open(&path), Err(Error::Pickle { .. })));

    // Legacy (pre-zip) torch files are refused with a clear message.
    let path = dir.path().join("legacy.pt");
    std::fs::write(
        &path,
        [
            0x80u8, 2, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8,
        ],
    )
    .unwrap();
    let msg = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(msg.contains("legacy"), "{msg}");
}

/// Re-saves a safetensors file as a torch zip checkpoint (`{"state_dict": ...}`).
fn to_ckpt(src: &std::path::Path, dst: &std::path::Path) {
    let ck = Checkpoint::open(src).unwrap();
    let tensors: Vec<TorchTensor> = ck
        .tensors()
        .iter()
        .map(|t| {
            let (class, es) = match t.dtype {
                DType::F16 => ("HalfStorage", 2),
                DType::F32 => ("FloatStorage", 4),
                DType::I64 => ("LongStorage", 8),
                other => panic!("{other}"),
            };
            let mut stride = vec![1usize; t.shape.len()];
            for d in (0..t.shape.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * t.shape[d + 1];
            }
            TorchTensor {
                name: t.name.clone(),
                storage_class: class,
                storage: ck.view(&t.name).unwrap().data.into_owned(),
                elem_size: es,
                offset: 0,
                size: t.shape.clone(),
                stride,
                parameter: false,
            }
        })
        .collect();
    torch_zip(dst, &tensors, true, None);
}

#[test]
fn a_ckpt_merges_like_its_safetensors_twin() {
    use mergesmith::arch::Family;
    use mergesmith::merge::{merge_files, MergeFiles, MergeSpec, Mode, Ratio, RunOptions};
    let m = related_models(
        Family::builtin("sd1"),
        mergesmith::dtype::FloatType::Fp16,
        51,
        0.3,
        2,
    );
    let ckpt = m.dir.path().join("a.ckpt");
    to_ckpt(&m.a, &ckpt);
    let a = Checkpoint::open(&ckpt).unwrap();
    assert_eq!(
        mergesmith::arch::detect(a.tensors()).family,
        Family::builtin("sd1")
    );
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.4), None);
    let memo = mergesmith::store::memo(m.dir.path());
    let outs: Vec<_> = [&ckpt, &m.a]
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let out = m.dir.path().join(format!("out{i}.safetensors"));
            merge_files(
                &MergeFiles {
                    a,
                    b: &m.b,
                    c: None,
                },
                &spec,
                &out,
                &memo,
                &RunOptions::default(),
            )
            .unwrap();
            Checkpoint::open(out).unwrap()
        })
        .collect();
    let layout = |c: &Checkpoint| -> Vec<(String, DType, Vec<usize>)> {
        c.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect()
    };
    assert!(
        layout(&outs[0]) == layout(&outs[1]),
        "same tensors, dtypes and shapes"
    );
    for t in outs[0].tensors() {
        assert!(
            outs[0].view(&t.name).unwrap().data == outs[1].view(&t.name).unwrap().data,
            "{}",
            t.name
        );
    }
}
