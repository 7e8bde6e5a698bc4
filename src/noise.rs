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

/// The 32-bit Mersenne Twister (MT19937) with the standard initialisation.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// Seeded as `std::mt19937(seed)`.
    pub fn new(seed: u32) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, index: 624 }
    }

    /// The next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(k + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}
