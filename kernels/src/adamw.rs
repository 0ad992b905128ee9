//! One fused AdamW pass over flat fp32 buffers (what torch's fused CPU AdamW
//! does): gradient scale, decoupled weight decay, both moments and the update,
//! each element read and written once, split across threads, and optionally the
//! updated weight rounded into a bfloat16 compute copy in the same pass.
use rayon::prelude::*;

/// The scalars of one step (bias corrections already folded in).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// `1 - beta1` and `1 - beta2`, rounded once from the f64 betas as torch
    /// does (in f32, `1 - 0.999f32` is off by 1.3e-5 relative).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bc2_sqrt: f32,
    /// `1 - lr * weight_decay`, applied to elements below `n_decay`.
    pub decay: f32,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f32,
}

/// The flat buffers of one optimizer, all of the same length.
pub struct Buffers<'a> {
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    /// bfloat16 bits of the updated parameters, written when present.
    pub shadow: Option<&'a mut [u16]>,
}

/// Elements per task: large enough to amortise scheduling, small enough to
/// balance two to a few dozen threads.
const CHUNK: usize = 1 << 15;

/// Runs one AdamW step over `b`; elements `[0, n_decay)` get weight decay.
pub fn step(s: &Step, n_decay: usize, b: Buffers<'_>) {
    let n = b.param.len();
    assert!(b.grad.len() == n && b.exp_avg.len() == n && b.exp_avg_sq.len() == n, "AdamW buffers differ in length");
    let shadow_chunks: Vec<Option<&mut [u16]>> = match b.shadow {
        Some(sh) => {
            assert_eq!(sh.len(), n, "bf16 shadow differs in length");
            sh.chunks_mut(CHUNK).map(Some).collect()
        }
        None => (0..n.div_ceil(CHUNK)).map(|_| None).collect(),
    };
    let kernel = pick_kernel();
    b.param
        .par_chunks_mut(CHUNK)
        .zip(b.grad.par_chunks(CHUNK))
        .zip(b.exp_avg.par_chunks_mut(CHUNK))
        .zip(b.exp_avg_sq.par_chunks_mut(CHUNK))
        .zip(shadow_chunks.into_par_iter())
        .enumerate()
        .for_each(|(c, ((((p, g), m), v), mut sh))| {
            // Split the chunk where decay stops, so each loop is branch-free.
            let cut = n_decay.saturating_sub(c * CHUNK).min(p.len());
            let (p0, p1) = p.split_at_mut(cut);
            let (m0, m1) = m.split_at_mut(cut);
            let (v0, v1) = v.split_at_mut(cut);
            let (g0, g1) = g.split_at(cut);
            let (s0, s1) = match sh.as_mut() {
                Some(sh) => {
                    let (a, b) = sh.split_at_mut(cut);
                    (Some(a), Some(b))
                }
                None => (None, None),
            };
            kernel(s, s.decay, p0, g0, m0, v0, s0);
            kernel(s, 1.0, p1, g1, m1, v1, s1);
        });
}

type Kernel = fn(&Step, f32, &mut [f32], &[f32], &mut [f32], &mut [f32], Option<&mut [u16]>);

/// The widest variant this CPU runs. All variants compute bit-identical results:
/// the same IEEE operations in the same order (no fused multiply-add).
fn pick_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return |s, d, p, g, m, v, sh| unsafe { x86::update_avx512(s, d, p, g, m, v, sh) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return |s, d, p, g, m, v, sh| unsafe { x86::update_avx2(s, d, p, g, m, v, sh) };
        }
    }
    update_portable
}

fn update_portable(
    s: &Step,
    decay: f32,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    sh: Option<&mut [u16]>,
) {
    update(s, decay, p, g, m, v, sh)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;

    /// [`update`] compiled for one instruction set; callers check the CPU first.
    macro_rules! variant {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                s: &Step,
                decay: f32,
                p: &mut [f32],
                g: &[f32],
                m: &mut [f32],
                v: &mut [f32],
                sh: Option<&mut [u16]>,
            ) {
                update(s, decay, p, g, m, v, sh)
            }
        };
    }

    variant!(update_avx512, "avx512f");
    variant!(update_avx2, "avx2");
}

/// The element-wise update, written so LLVM vectorises it (equal-length
/// slices, no branches in the loop body).
#[inline(always)]
fn update(s: &Step, decay: f32, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], sh: Option<&mut [u16]>) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    let (one_b1, one_b2) = (s.one_minus_beta1, s.one_minus_beta2);
    // No closure here: a closure does not inherit the caller's target features,
    // so it would be neither inlined nor vectorised.
    macro_rules! element {
        ($i:expr) => {{
            let i = $i;
            let gi = g[i] * s.grad_scale;
            let pi = p[i] * decay;
            let mi = m[i] + (gi - m[i]) * one_b1;
            let vi = v[i] * s.beta2 + one_b2 * gi * gi;
            m[i] = mi;
            v[i] = vi;
            pi - s.step_size * mi / (vi.sqrt() / s.bc2_sqrt + s.eps)
        }};
    }
    match sh {
        Some(sh) => {
            let sh = &mut sh[..n];
            for i in 0..n {
                let pi = element!(i);
                p[i] = pi;
                sh[i] = crate::bf16::from_f32(pi);
            }
        }
        None => {
            for i in 0..n {
                p[i] = element!(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no dependency needed for tests).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// The step written plainly, one element at a time.
    fn reference(s: &Step, n_decay: usize, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for i in 0..p.len() {
            let gi = g[i] * s.grad_scale;
            let pi = if i < n_decay { p[i] * s.decay } else { p[i] };
            m[i] += (gi - m[i]) * s.one_minus_beta1;
            v[i] = v[i] * s.beta2 + s.one_minus_beta2 * gi * gi;
            p[i] = pi - s.step_size * m[i] / (v[i].sqrt() / s.bc2_sqrt + s.eps);
        }
    }

    #[test]
    fn fused_step_equals_the_plain_loop_bit_for_bit_and_fills_the_shadow() {
        let n = 3 * CHUNK + 1234;
        let s = Step {
            step_size: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            one_minus_beta1: 0.1,
            one_minus_beta2: 0.001,
            eps: 1e-8,
            bc2_sqrt: 0.3,
            decay: 0.99,
            grad_scale: 0.7,
        };
        for n_decay in [0, 17, CHUNK, 2 * CHUNK + 5, n] {
            let (mut p, g) = (values(n, 1, 2.0), values(n, 2, 1.0));
            let (mut m, mut v) = (values(n, 3, 0.1), values(n, 4, 0.01).iter().map(|x| x.abs()).collect::<Vec<_>>());
            let (mut rp, mut rm, mut rv) = (p.clone(), m.clone(), v.clone());
            reference(&s, n_decay, &mut rp, &g, &mut rm, &mut rv);
            let mut shadow = vec![0u16; n];
            let b = Buffers { param: &mut p, grad: &g, exp_avg: &mut m, exp_avg_sq: &mut v, shadow: Some(&mut shadow) };
            step(&s, n_decay, b);
            assert!(p.iter().zip(&rp).all(|(a, b)| a.to_bits() == b.to_bits()), "params, n_decay {n_decay}");
            assert!(m.iter().zip(&rm).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(v.iter().zip(&rv).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(shadow.iter().zip(&p).all(|(&h, &x)| h == crate::bf16::from_f32(x)));
        }
    }

    #[test]
    fn every_instruction_set_variant_gives_the_same_bits() {
        let n = 1000;
        let s = Step {
            step_size: 0.01,
            beta1: 0.8,
            beta2: 0.99,
            one_minus_beta1: 0.2,
            one_minus_beta2: 0.01,
            eps: 1e-6,
            bc2_sqrt: 0.5,
            decay: 0.9,
            grad_scale: 1.0,
        };
        let run = |k: Kernel| {
            let (mut p, g, mut m) = (values(n, 5, 1.0), values(n, 6, 1.0), values(n, 7, 0.1));
            let mut v: Vec<f32> = values(n, 8, 0.1).iter().map(|x| x * x).collect();
            let mut sh = vec![0u16; n];
            k(&s, s.decay, &mut p, &g, &mut m, &mut v, Some(&mut sh));
            (p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), sh)
        };
        let want = run(update_portable);
        assert_eq!(run(pick_kernel()), want);
    }
}
