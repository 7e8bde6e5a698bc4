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

    /// `v`'s buffer from its start, through its capacity: an empty `v`'s elements are then
    /// written in full through it before its length is set.
    pub(crate) fn spare(v: &mut Vec<f32>) -> SharedOut {
        SharedOut(v.as_mut_ptr())
    }

    /// The same buffer from element `n` on (the writes through it stay what make it safe).
    pub(crate) fn offset(self, n: usize) -> SharedOut {
        SharedOut(self.0.wrapping_add(n))
    }

    /// The pointer (a method, so closures capture the whole `SharedOut`, which is `Sync`).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Each thread's scratch buffer (im2col tiles, attention scores), reused across calls.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` values, left as earlier use left them
/// (callers that need zeros write them). The buffer is taken out of its slot while `f` runs,
/// not borrowed in it: when `f` waits on parallel work, rayon may run another kernel's part on
/// this thread, which then gets a buffer of its own.
pub(crate) fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [f32]) -> T) -> T {
    let mut buf = SCRATCH.take();
    buf.resize(len.max(buf.len()), 0.0);
    let out = f(&mut buf[..len]);
    SCRATCH.set(buf);
    out
}

/// Keeps freed memory in the allocator instead of handing it back to the OS (glibc's
/// `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD`), once per process. Generation frees and
/// allocates activations of tens to hundreds of MiB at every layer; returned to the OS, each
/// comes back as freshly faulted, zeroed pages (a fifth of a bf16 SD1 step's time, measured
/// with `perf`). The cost is a resident size that stays at its peak.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets the allocator's thresholds.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        });
    }
}

/// Defines a function whose body is compiled three times, for AVX-512F, for AVX2 + FMA and for
/// the baseline, the first the CPU supports picked at run time: plain loops over slices that
/// LLVM vectorises to the widest registers available.
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// Helpers of the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    /// `n` deterministic values in [−scale, scale) from a small LCG.
    pub fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                ((state >> 8) as f32 / (1u32 << 23) as f32 - 1.0) * scale
            })
            .collect()
    }

    /// `f`'s result on a rayon pool of `threads` threads.
    pub fn on_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// A tensor's values, flattened.
    pub fn flat(t: &candle_core::Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
}
