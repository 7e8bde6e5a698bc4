//! Where merge arithmetic runs: mergesmith's own CPU kernels (the default), or a candle
//! device (`cuda[:N]` with the `cuda` feature; `candle-cpu` runs the same candle code on the
//! CPU, to test that path without a GPU).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType as CDType, Device, Tensor};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A compute device for merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// mergesmith's CPU kernels (f32 accumulation, parallel chunks).
    #[default]
    Cpu,
    /// candle on the CPU: the GPU code path, runnable anywhere (tests, comparisons).
    CandleCpu,
    /// candle on CUDA device N (needs a build with the `cuda` feature).
    Cuda(usize),
}

impl FromStr for ComputeDevice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(ComputeDevice::Cpu),
            "candle-cpu" => Ok(ComputeDevice::CandleCpu),
            "cuda" => Ok(ComputeDevice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(ComputeDevice::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::CandleCpu => f.write_str("candle-cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl ComputeDevice {
    /// The candle device, or `None` for mergesmith's own CPU kernels.
    pub fn candle(self) -> Result<Option<Device>> {
        match self {
            ComputeDevice::Cpu => Ok(None),
            ComputeDevice::CandleCpu => Ok(Some(Device::Cpu)),
            ComputeDevice::Cuda(n) => Device::new_cuda(n).map(Some).map_err(|e| {
                let hint = if cfg!(feature = "cuda") {
                    String::new()
                } else {
                    "; this mergesmith was built without the `cuda` feature (rebuild with --features cuda)".into()
                };
                Error::Invalid(format!("cannot use cuda:{n}: {e}{hint}"))
            }),
        }
    }
}

/// candle's name for a storage type.
pub fn candle_dtype(d: DType) -> Result<CDType> {
    Ok(match d {
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
        DType::F32 => CDType::F32,
        DType::F64 => CDType::F64,
        other => {
            return Err(Error::Invalid(format!(
                "{other} tensors are not computed on a candle device"
            )))
        }
    })
}

/// Uploads raw little-endian bytes of a float tensor as f32 on `dev`.
pub fn upload_f32(bytes: &[u8], dtype: DType, dev: &Device) -> Result<Tensor> {
    let es = dtype.bits() / 8;
    let t = Tensor::from_raw_buffer(bytes, candle_dtype(dtype)?, &[bytes.len() / es], dev)
        .map_err(candle_err)?;
    t.to_dtype(CDType::F32).map_err(candle_err)
}

/// Rounds an f32 tensor to `dtype` on its device and downloads its bytes.
pub fn download(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let t = t.to_dtype(candle_dtype(dtype)?).map_err(candle_err)?;
    let bytes = match dtype {
        DType::F16 => bytemuck::cast_slice(&t.to_vec1::<half::f16>().map_err(candle_err)?).to_vec(),
        DType::BF16 => {
            bytemuck::cast_slice(&t.to_vec1::<half::bf16>().map_err(candle_err)?).to_vec()
        }
        DType::F32 => bytemuck::cast_slice(&t.to_vec1::<f32>().map_err(candle_err)?).to_vec(),
        _ => bytemuck::cast_slice(&t.to_vec1::<f64>().map_err(candle_err)?).to_vec(),
    };
    Ok(bytes)
}

/// Wraps a candle error.
pub fn candle_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("candle: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_devices() {
        assert_eq!("cpu".parse::<ComputeDevice>().unwrap(), ComputeDevice::Cpu);
        assert_eq!(
            "cuda".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(3)
        );
        assert!("gpu".parse::<ComputeDevice>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let e = ComputeDevice::Cuda(0).candle().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
