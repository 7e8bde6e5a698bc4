//! The candle device path (used for `--device cuda`) agrees with mergesmith's CPU kernels:
//! it is run here on candle's CPU device, so it is tested on machines without a GPU.

use crate::common::*;
use mergesmith::arch::Family;
use mergesmith::checkpoint::Checkpoint;
use mergesmith::device::ComputeDevice;
use mergesmith::dtype::FloatType;
use mergesmith::merge::{merge_files, CalcMode, MergeFiles, MergeSpec, Mode, Ratio, RunOptions};

#[test]
fn candle_path_matches_cpu_kernels() {
    let m = related_models(Family::builtin("sd1"), FloatType::Fp16, 31, 0.5, 2);
    let memo = mergesmith::store::memo(m.dir.path());
    let cases = [
        (Mode::WeightSum, CalcMode::Normal, 0.3, None),
        (Mode::AddDifference, CalcMode::Normal, 0.7, None),
        (Mode::TripleSum, CalcMode::Normal, 0.3, Some(0.2)),
        (Mode::SumTwice, CalcMode::Normal, 0.4, Some(0.6)),
        (Mode::AddDifference, CalcMode::TrainDifference, 0.5, None),
        (Mode::WeightSum, CalcMode::SelfScale, 0.8, None),
    ];
    for (i, (mode, calc, alpha, beta)) in cases.into_iter().enumerate() {
        let mut spec = MergeSpec::new(mode, Ratio::Scalar(alpha), beta.map(Ratio::Scalar));
        spec.calcmode = calc;
        spec.dtype = Some(FloatType::Bf16);
        let files = MergeFiles {
            a: &m.a,
            b: &m.b,
            c: mode.uses_c().then_some(m.c.as_path()),
        };
        let mut outs = Vec::new();
        for device in [ComputeDevice::Cpu, ComputeDevice::CandleCpu] {
            let out = m.dir.path().join(format!("{i}-{device}.safetensors"));
            let run = RunOptions {
                device,
                ..RunOptions::default()
            };
            merge_files(&files, &spec, &out, &memo, &run).unwrap();
            outs.push(Checkpoint::open(out).unwrap());
        }
        let mut compared = 0;
        for t in outs[0].tensors() {
            let (x, y) = (
                outs[0].view(&t.name).unwrap(),
                outs[1].view(&t.name).unwrap(),
            );
            // Same bits, except that a zero may differ in sign.
            let same = x
                .data
                .chunks(2)
                .zip(y.data.chunks(2))
                .all(|(p, q)| p == q || (p[0] == 0 && q[0] == 0 && (p[1] | q[1]) & 0x7f == 0));
            assert!(
                same,
                "{mode:?} {calc:?}: `{}` differs between cpu and candle",
                t.name
            );
            compared += 1;
        }
        assert_eq!(compared, 1143);
    }
}

#[test]
fn cuda_request_is_clear_without_a_gpu_build() {
    if cfg!(feature = "cuda") {
        return; // a CUDA build may or may not have a GPU here: nothing to assert
    }
    let m = related_models(Family::builtin("sd1"), FloatType::Fp16, 41, 0.5, 2);
    let spec = MergeSpec::new(Mode::WeightSum, Ratio::Scalar(0.5), None);
    let run = RunOptions {
        device: ComputeDevice::Cuda(0),
        ..RunOptions::default()
    };
    let files = MergeFiles {
        a: &m.a,
        b: &m.b,
        c: None,
    };
    let out = m.dir.path().join("x.safetensors");
    let e = merge_files(
        &files,
        &spec,
        &out,
        &mergesmith::store::memo(m.dir.path()),
        &run,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--features cuda"), "{e}");
    assert!(!out.exists());
}
