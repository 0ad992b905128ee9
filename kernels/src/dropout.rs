//! Dropout masks from a counter-based hash, filled in parallel: element `i` of
//! the mask keyed by `seed` is `drop` where a 32-bit hash of `(seed, i)` falls
//! below a threshold, else `keep`. libtorch's CPU `bernoulli_` draws from one
//! generator in a serial loop (4-7% of a CPU training step); here each element
//! depends on its index alone, so the loop vectorises and splits across
//! threads, and the same seed gives the same mask on any number of threads.
use rayon::prelude::*;

/// Elements per task.
const CHUNK: usize = 1 << 16;

/// The threshold of drop probability `p` in [0, 1]: a 32-bit hash below it drops.
pub fn threshold(p: f64) -> u64 {
    (p.clamp(0.0, 1.0) * 4_294_967_296.0).round() as u64
}

/// SplitMix64's finaliser: the keys of one block of 2^32 elements.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A bijective 32-bit mixer (Chris Wellons' `lowbias32`).
#[inline(always)]
fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

/// The hash of element `i` of a block keyed by `k1`, `k2`: two keyed rounds, so
/// masks of different seeds are not index permutations of each other.
#[inline(always)]
fn hash(i: u32, k1: u32, k2: u32) -> u32 {
    lowbias32(lowbias32(i ^ k1).wrapping_add(k2))
}

/// Fills `out` with the mask of `seed`: `drop` where the element's hash is
/// below `threshold` ([`threshold`]), else `keep`. `T` is the bit pattern of the
/// mask's dtype (`u32` for f32, `u16` for bf16, `u64` for f64).
pub fn fill<T: Copy + Send + Sync + PartialEq>(seed: u64, threshold: u64, keep: T, drop: T, out: &mut [T]) {
    let kernel = pick_kernel::<T>();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
        let start = (c * CHUNK) as u64;
        let keys = splitmix64(seed ^ splitmix64(start >> 32));
        // A chunk never crosses a 2^32 boundary: CHUNK divides 2^32.
        kernel(start as u32, keys as u32, (keys >> 32) as u32, threshold, keep, drop, chunk);
    });
}

type Kernel<T> = fn(u32, u32, u32, u64, T, T, &mut [T]);

fn pick_kernel<T: Copy + PartialEq>() -> Kernel<T> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |b, k1, k2, t, keep, drop, out| unsafe { x86::fill_avx512(b, k1, k2, t, keep, drop, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return |b, k1, k2, t, keep, drop, out| unsafe { x86::fill_avx2(b, k1, k2, t, keep, drop, out) };
        }
    }
    fill_block
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::fill_block`] compiled for one instruction set; callers check the CPU first.
    macro_rules! variant {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name<T: Copy + PartialEq>(
                base: u32,
                k1: u32,
                k2: u32,
                threshold: u64,
                keep: T,
                drop: T,
                out: &mut [T],
            ) {
                super::fill_block(base, k1, k2, threshold, keep, drop, out)
            }
        };
    }

    variant!(fill_avx512, "avx512f");
    variant!(fill_avx2, "avx2");
}

/// One chunk, elements `base..base + out.len()` of its block; written without
/// branches so LLVM vectorises it.
#[inline(always)]
fn fill_block<T: Copy + PartialEq>(base: u32, k1: u32, k2: u32, threshold: u64, keep: T, drop: T, out: &mut [T]) {
    if threshold > u32::MAX as u64 {
        out.fill(drop);
        return;
    }
    let t = threshold as u32;
    for (j, o) in out.iter_mut().enumerate() {
        let r = hash(base.wrapping_add(j as u32), k1, k2);
        *o = if r < t { drop } else { keep };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(seed: u64, p: f64, n: usize) -> Vec<u32> {
        let mut out = vec![7u32; n];
        fill(seed, threshold(p), 1, 0, &mut out);
        out
    }

    #[test]
    fn the_drop_rate_is_p() {
        for p in [0.1, 0.5, 0.9] {
            let n = 1 << 20;
            let dropped = mask(42, p, n).iter().filter(|&&m| m == 0).count() as f64 / n as f64;
            // Binomial standard deviation at n = 2^20 is below 5e-4.
            assert!((dropped - p).abs() < 3e-3, "p {p}: dropped {dropped}");
        }
        assert!(mask(1, 0.0, 4096).iter().all(|&m| m == 1));
        assert!(mask(1, 1.0, 4096).iter().all(|&m| m == 0));
    }

    #[test]
    fn a_seed_gives_one_mask_and_other_seeds_independent_ones() {
        let n = 3 * CHUNK + 17;
        let a = mask(5, 0.5, n);
        assert_eq!(a, mask(5, 0.5, n), "same seed, same mask");
        // A prefix is the same mask: the mask depends on the index alone.
        assert_eq!(&mask(5, 0.5, 1000)[..], &a[..1000]);
        for other in [6, 5 ^ (1 << 40), u64::MAX] {
            let b = mask(other, 0.5, n);
            let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64;
            assert!((same - 0.5).abs() < 0.01, "seed {other}: {same} of the elements agree");
        }
        // Neighbours are not correlated: P(both dropped) = p^2.
        let both = a.windows(2).filter(|w| w[0] == 0 && w[1] == 0).count() as f64 / (n - 1) as f64;
        assert!((both - 0.25).abs() < 0.01, "adjacent pairs both dropped: {both}");
    }

    #[test]
    fn every_width_and_kernel_writes_the_same_mask() {
        let n = CHUNK + 333;
        let want = mask(9, 0.3, n);
        let mut narrow = vec![0u16; n];
        fill(9, threshold(0.3), 0x3F8E, 0, &mut narrow);
        assert!(want.iter().zip(&narrow).all(|(&w, &m)| (w == 1) == (m == 0x3F8E)));
        let mut portable = vec![0u32; CHUNK];
        let keys = splitmix64(9 ^ splitmix64(0));
        fill_block(0, keys as u32, (keys >> 32) as u32, threshold(0.3), 1, 0, &mut portable);
        assert_eq!(&portable[..], &want[..CHUNK]);
    }
}
