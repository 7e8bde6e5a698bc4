//! What the CPU kernels ([`crate::gen::conv`], [`crate::gen::attention`],
//! [`crate::gen::norm`]) share: the f32 slice behind a candle storage, and an output pointer
//! that parallel parts writing disjoint elements share.

use candle_core::{backend::BackendStorage, CpuStorage, Layout, Result};

/// The contiguous f32 slice behind a storage and its layout; `what` names the operand in
/// errors (`op: what is ...`).
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: {what} is {:?}, not f32", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{op}: {what} is not contiguous"),
    }
}

/// A raw output pointer shared by parallel parts that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(*mut f32);

// SAFETY: the kernels that share one write disjoint elements of a buffer that outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Shares `buf`'s elements.
    pub(crate) fn new(buf: &mut [f32]) -> SharedOut {
        SharedOut(buf.as_mut_ptr())
    }

    /// The pointer (a method, so closures capture the whole `SharedOut`, which is `Sync`).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}
