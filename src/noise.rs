//! Seeded, portable pseudo-random streams: one xoshiro256++ stream per (domain, seed, key,
//! stream index), seeded through blake3, so results never depend on thread count or order.

use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

/// The generator for one stream.
pub fn rng(domain: &str, seed: u64, key: &str, stream: u64) -> Xoshiro256PlusPlus {
    let mut h = blake3::Hasher::new();
    h.update(domain.as_bytes());
    h.update(b"\0");
    h.update(&seed.to_le_bytes());
    h.update(key.as_bytes());
    h.update(&stream.to_le_bytes());
    Xoshiro256PlusPlus::from_seed(*h.finalize().as_bytes())
}

/// Fills `out` with standard-normal values from one stream.
pub fn fill_normal(domain: &str, seed: u64, key: &str, stream: u64, out: &mut [f32]) {
    let mut r = rng(domain, seed, key, stream);
    for x in out {
        *x = r.sample(StandardNormal);
    }
}
