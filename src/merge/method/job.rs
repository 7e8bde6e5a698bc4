//! One tensor of a list merge, read in chunks.
//!
//! A kernel never holds a whole input: it asks the job for passes over fixed-size chunks
//! (decoded to f32, deltas already subtracted) and reduces what it needs (norms, histograms,
//! counts) in chunk order, so sums are the same whatever the thread count. Random draws come
//! from one stream per (seed, tensor, input, chunk), so they do not depend on threads, order
//! or which tensors a rebuild recomputes.

use rayon::prelude::*;

use super::KeyParams;
use crate::error::Result;
use crate::merge::engine::{Operand, CHUNK};

/// Where merged values go: `(first element, values)`.
pub type Out<'o> = dyn Fn(usize, &[f32]) -> Result<()> + Sync + 'o;

/// One input term: a model, or a model minus another.
pub struct TermOps<'a> {
    /// The model.
    pub x: Operand<'a>,
    /// What is subtracted from it (a delta).
    pub minus: Option<Minus<'a>>,
}

/// What a delta subtracts.
pub enum Minus<'a> {
    /// The job's base (decoded once per chunk for every input).
    Base,
    /// Another model.
    Other(Operand<'a>),
}

/// One tensor's inputs and parameters.
pub struct Job<'a> {
    /// Tensor name (random streams are keyed by it).
    pub name: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// The base, for methods that have one.
    pub base: Option<Operand<'a>>,
    /// The inputs, in order.
    pub terms: Vec<TermOps<'a>>,
    /// Each input's weight for this tensor (1 for unweighted methods).
    pub weights: Vec<f64>,
    /// The parameters this tensor sees.
    pub params: &'a KeyParams,
}

/// One chunk of a tensor, decoded.
pub struct Chunk {
    /// Its index (chunks have a fixed size: [`CHUNK`] elements, or whole groups).
    pub index: u64,
    /// First element.
    pub lo: usize,
    /// The base's values (empty without a base).
    pub base: Vec<f32>,
    /// Each input's values (a delta's already subtracted).
    pub x: Vec<Vec<f32>>,
}

impl Chunk {
    /// Elements in the chunk.
    pub fn len(&self) -> usize {
        self.x.first().map_or(self.base.len(), Vec::len)
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Job<'_> {
    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Chunk bounds: [`CHUNK`] elements rounded down to whole groups of `group` elements
    /// (at least one group per chunk).
    pub fn chunks(&self, group: usize) -> Vec<(usize, usize)> {
        let n = self.numel();
        let g = group.max(1);
        let size = ((CHUNK / g).max(1)) * g;
        (0..n.div_ceil(size))
            .map(|i| (i * size, ((i + 1) * size).min(n)))
            .collect()
    }

    fn decode(&self, index: usize, lo: usize, hi: usize) -> Result<Chunk> {
        let mut base = Vec::new();
        if let Some(b) = &self.base {
            b.decode(lo, hi, &mut base)?;
        }
        let mut x = Vec::with_capacity(self.terms.len());
        let mut minus = Vec::new();
        for t in &self.terms {
            let mut v = Vec::new();
            t.x.decode(lo, hi, &mut v)?;
            let m: Option<&[f32]> = match &t.minus {
                Some(Minus::Base) => Some(&base),
                Some(Minus::Other(m)) => {
                    m.decode(lo, hi, &mut minus)?;
                    Some(&minus)
                }
                None => None,
            };
            if let Some(m) = m {
                v.iter_mut().zip(m).for_each(|(a, b)| *a -= b);
            }
            x.push(v);
        }
        Ok(Chunk {
            index: index as u64,
            lo,
            base,
            x,
        })
    }

    /// One pass: `f` of every chunk (chunks grouped by `group` elements), in chunk order.
    pub fn map<T: Send>(
        &self,
        group: usize,
        f: impl Fn(&Chunk) -> T + Sync + Send,
    ) -> Result<Vec<T>> {
        self.chunks(group)
            .into_par_iter()
            .enumerate()
            .map(|(i, (lo, hi))| Ok(f(&self.decode(i, lo, hi)?)))
            .collect()
    }

    /// The output pass: `f` writes each chunk's merged values, which go to `out`.
    pub fn emit(
        &self,
        group: usize,
        f: impl Fn(&Chunk, &mut [f32]) + Sync + Send,
        out: &Out,
    ) -> Result<()> {
        self.chunks(group)
            .into_par_iter()
            .enumerate()
            .try_for_each(|(i, (lo, hi))| {
                let c = self.decode(i, lo, hi)?;
                let mut vals = vec![0f32; hi - lo];
                f(&c, &mut vals);
                out(lo, &vals)
            })
    }

    /// An order-independent reduction over the chunks (integer counts only: the result must
    /// not depend on how chunks are grouped).
    pub fn fold<T: Send>(
        &self,
        group: usize,
        init: impl Fn() -> T + Sync + Send,
        step: impl Fn(&mut T, &Chunk) + Sync + Send,
        join: impl Fn(T, T) -> T + Sync + Send,
    ) -> Result<T> {
        self.chunks(group)
            .into_par_iter()
            .enumerate()
            .try_fold(&init, |mut acc, (i, (lo, hi))| {
                step(&mut acc, &self.decode(i, lo, hi)?);
                Ok(acc)
            })
            .try_reduce(&init, |a, b| Ok(join(a, b)))
    }

    /// Uniform draws in [0, 1) for input `term` over one chunk, from the method's seed.
    pub fn uniform(&self, domain: &str, term: usize, chunk: &Chunk) -> Vec<f64> {
        use rand::RngExt;
        let stream = ((term as u64) << 40) | chunk.index;
        let mut r = crate::noise::rng(domain, self.params.count("seed"), self.name, stream);
        (0..chunk.len())
            .map(|_| (r.random::<u64>() >> 11) as f64 * (1.0 / (1u64 << 53) as f64))
            .collect()
    }
}

/// Sums of per-chunk f64 vectors, in chunk order (the same bits whatever the threads).
pub fn sum_in_order(parts: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut acc = vec![0f64; len];
    for p in parts {
        acc.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    acc
}
