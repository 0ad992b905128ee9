//! `x.linear(weight, bias)` for every projection of the models (layers, fused
//! q/k/v, MLM heads), computed by fp32 GEMMs where the policy routes bf16 GEMMs
//! so ([`policy::gemm_via_f32`]: a CPU without bf16 instructions).
//!
//! The arithmetic stays a bf16 GEMM's (exact upcast, fp32 sums, one rounding
//! of the result; only the order of the sums differs), and the autograd
//! function of `src/shims/linear_f32.cpp` saves the bf16 input and weight as a
//! bf16 `linear` does, so the activation memory is unchanged; the input and
//! weight gradients are fp32 GEMMs too.
use tch::Tensor;

use super::policy;

/// `x.linear(weight, bias)`: x [..., in], weight [out, in], bias [out].
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    if policy::gemm_via_f32(x.device(), x.kind()) {
        linear_via_f32(x, weight, bias)
    } else {
        x.linear(weight, bias)
    }
}

/// [`linear`] through fp32 GEMMs whatever the CPU, differentiable in all three
/// inputs; the result in `x`'s dtype. Panics on a libtorch error (mismatched
/// shapes), as tch's own ops do.
pub fn linear_via_f32(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    crate::shims::linear_via_f32(x, weight, bias).unwrap_or_else(|e| panic!("linear through fp32 GEMMs failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn wave(shape: &[i64], seed: f64) -> Tensor {
        (Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)) * seed).sin().view(shape)
    }

    /// Output and gradients of x, weight and bias (fp32) under a fixed loss.
    fn run(f: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor, kind: Kind, with_bias: bool) -> Vec<Tensor> {
        let x = wave(&[3, 5, 16], 0.37).to_kind(kind).set_requires_grad(true);
        let w = wave(&[24, 16], 0.91).to_kind(kind).set_requires_grad(true);
        let b = wave(&[24], 1.53).to_kind(kind).set_requires_grad(true);
        let out = f(&x, &w, with_bias.then_some(&b));
        let weights = wave(&out.size(), 0.11);
        (out.to_kind(Kind::Float) * weights).sum(Kind::Float).backward();
        let mut all = vec![out.to_kind(Kind::Float), x.grad().to_kind(Kind::Float), w.grad().to_kind(Kind::Float)];
        if with_bias {
            all.push(b.grad().to_kind(Kind::Float));
        } else {
            assert!(!b.grad().defined(), "an absent bias has no gradient");
        }
        all
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn bf16_through_fp32_gemms_equals_upcast_reference_and_bf16_linear() {
        for with_bias in [true, false] {
            let ours = run(linear_via_f32, Kind::BFloat16, with_bias);
            // The same arithmetic by autograd: upcast, fp32 linear, round.
            let upcast = |x: &Tensor, w: &Tensor, b: Option<&Tensor>| {
                let b = b.map(|b| b.to_kind(Kind::Float));
                x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), b.as_ref()).to_kind(Kind::BFloat16)
            };
            let reference = run(upcast, Kind::BFloat16, with_bias);
            // libtorch's own bf16 linear: the same up to the order of fp32 sums,
            // i.e. one bf16 rounding step at most.
            let bf16 = run(|x, w, b| x.linear(w, b), Kind::BFloat16, with_bias);
            for (i, ((o, r), l)) in ours.iter().zip(&reference).zip(&bf16).enumerate() {
                let scale = r.abs().max().double_value(&[]).max(1.0);
                assert!(max_diff(o, r) <= scale / 256.0, "bias {with_bias} tensor {i}: {:.3e}", max_diff(o, r));
                assert!(max_diff(o, l) <= scale / 64.0, "bias {with_bias} tensor {i}: {:.3e}", max_diff(o, l));
            }
        }
    }

    #[test]
    fn fp32_inputs_give_fp32_linear() {
        let ours = run(linear_via_f32, Kind::Float, true);
        let plain = run(|x, w, b| x.linear(w, b), Kind::Float, true);
        for (i, (o, p)) in ours.iter().zip(&plain).enumerate() {
            assert!(max_diff(o, p) <= 1e-5, "tensor {i}: {:.3e}", max_diff(o, p));
        }
    }

    #[test]
    fn shape_errors_are_reported_not_aborted() {
        let x = Tensor::zeros([2, 3], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::zeros([4, 5], (Kind::BFloat16, Device::Cpu));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| linear_via_f32(&x, &w, None)));
        let message = caught.expect_err("mismatched shapes fail");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.starts_with("linear through fp32 GEMMs failed: "), "{text}");
    }
}
