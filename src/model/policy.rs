//! Device and dtype decisions, made here and nowhere else: which route a GEMM
//! takes, which path attention takes, whose dropout runs. The models ask
//! (`linear_f32.rs`, `layers.rs`, `deberta_attention.rs`), and so does the
//! memory estimate (`src/train/memory.rs`), which counts what the chosen path
//! keeps. A leaf: it knows devices, dtypes and this CPU, nothing of the models.
//!
//! Each rule carries the measurement that chose it.
use tch::{Device, Kind, Tensor};

/// Whether this CPU multiplies bf16 in hardware (AVX512-BF16, which every
/// CPU with AMX also has), so that libtorch's bf16 matmuls on it (oneDNN) beat
/// its fp32 ones instead of emulating bf16 (`mlm doctor` says which).
#[cfg(target_arch = "x86_64")]
pub fn cpu_has_bf16_dot() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Arm: the BF16 extension (BFDOT, BFMMLA; Graviton 3 and later, Neoverse V1/V2).
#[cfg(target_arch = "aarch64")]
pub fn cpu_has_bf16_dot() -> bool {
    std::arch::is_aarch64_feature_detected!("bf16")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn cpu_has_bf16_dot() -> bool {
    false
}

/// Whether GEMMs of `kind` on `device` run as fp32 GEMMs (`linear_f32.rs`):
/// bf16 on a CPU that does not multiply bf16 in hardware
/// ([`cpu_has_bf16_dot`]). There libtorch's bf16 GEMM is an emulation: a
/// `[1024, 768] x [768, 3072]` product took 86 ms against 19 ms for upcast +
/// fp32 GEMM + round (2 threads of a Xeon with AVX-512 but without
/// AVX512-BF16, torch 2.11).
///
/// And fp16 on any CPU: training in fp16 on a CPU is for checking the fp16
/// path (loss scaling) against a reference, not for speed; the GPU is its
/// target. Through fp32 GEMMs its arithmetic is an fp16 GEMM's with fp32 sums,
/// whatever libtorch's CPU fp16 kernels would do on this CPU.
pub fn gemm_via_f32(device: Device, kind: Kind) -> bool {
    device == Device::Cpu && (kind == Kind::Half || (kind == Kind::BFloat16 && !cpu_has_bf16_dot()))
}

/// The dtype of the batched matmuls of attention written out
/// ([`AttentionPath::WrittenOut`]) for activations of `kind` on `device`:
/// fp32 where GEMMs of `kind` run as fp32 ones ([`gemm_via_f32`]; libtorch's
/// emulated bf16 `bmm` on such a CPU is many times slower than its fp32 one)
/// and for fp16, else `kind`. The softmax runs in fp32 whatever this says.
pub fn attention_matmul_kind(device: Device, kind: Kind) -> Kind {
    if kind == Kind::Half || gemm_via_f32(device, kind) {
        Kind::Float
    } else {
        kind
    }
}

/// The attention a model computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attention {
    /// softmax(q k^T / sqrt(d) + padding bias) v: BERT, DistilBERT, RoBERTa
    /// (`layers::attention`), and GPT-2's causal attention
    /// (`layers::causal_attention`: the causal mask in the bias, or SDPA's
    /// `is_causal` without padding), whose path follows the same rule.
    Plain,
    /// DeBERTa's disentangled attention, whose c2p and p2c terms are a score
    /// bias that needs a gradient (`deberta_attention.rs`).
    Disentangled,
}

/// How attention is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// The scores written out by our code: matmuls in
    /// [`attention_matmul_kind`], the softmax and its dropout in fp32. It keeps
    /// for backward what libtorch's math kernel keeps.
    WrittenOut,
    /// libtorch's `scaled_dot_product_attention`, whose dispatcher picks the
    /// kernel ([`sdpa_kernel`]).
    Sdpa,
}

/// The path of `attention` over activations of `kind` on `device` with
/// dropout `dropout` on the probabilities (0 outside training).
///
/// Plain attention writes its scores out when training on the CPU in fp32 or
/// bf16. There SDPA runs its math kernel (no fused CPU kernel takes dropout),
/// which copies q, k, v and the scores to fp32 and adds `_safe_softmax`'s
/// passes. Measured, whole steps of DistilBERT-base (batch 8 x 128, 2 threads):
/// - bf16 on a Xeon with AMX (bf16 matmuls), the two taking turns step by step
///   in one process: 0.64-0.67 s written out against 0.69-0.77 s (faster in 33
///   of 38 pairs of steps);
/// - fp32 on a Xeon without AVX512-BF16, with the CPU dropout masks
///   ([`DropoutRoute::CpuMask`]): forward 0.44-0.47 s against SDPA's
///   0.51-0.56 s, step 1.34-1.40 s against 1.39-1.50 s (three runs each); with
///   libtorch's serial `bernoulli_` masks they had tied;
/// - bf16 on that Xeon, the matmuls in fp32 ([`gemm_via_f32`]): median 641
///   tokens/s against SDPA's 608 (five runs each, taking turns).
///
/// Without dropout, a CPU training block (no padding, no mask) takes SDPA's
/// flash kernel.
///
/// Disentangled attention writes its scores out on the CPU in fp32 and bf16,
/// with or without dropout (its bias needs a gradient: SDPA would run the
/// math kernel). The 30,522-vocabulary DeBERTa-v3-small shape in bf16 on 2
/// threads of a Xeon without AVX512-BF16, three runs each taking turns:
/// 542-555 tokens/s against 460-490 through the math kernel. A whole training
/// step of that shape (batch 8 x 128, bf16, 2 threads of a Xeon with AMX),
/// taking turns step by step in one process (19 pairs of steps each way): the
/// scores written out with bf16 matmuls took 0.86-0.95 s where libtorch's math
/// kernel took 1.07-1.14 s (faster in 34 of 38 pairs) and the written-out fp32
/// matmuls 0.94-1.06 s (33 of 38). One layer's attention, b 8 x s 128,
/// forward and backward, on a loaded 2-core VM without AVX-512: fp32 1.95 s
/// written out against 4.16 s through the math kernel.
///
/// On a GPU, SDPA: its fused kernels (flash, memory-efficient) take dropout
/// and a bias.
pub fn attention_path(attention: Attention, device: Device, kind: Kind, dropout: f64) -> AttentionPath {
    let cpu_float = device == Device::Cpu && matches!(kind, Kind::Float | Kind::BFloat16);
    let written_out = match attention {
        Attention::Plain => cpu_float && dropout > 0.0,
        Attention::Disentangled => cpu_float,
    };
    if written_out {
        AttentionPath::WrittenOut
    } else {
        AttentionPath::Sdpa
    }
}

/// The kernel libtorch's `scaled_dot_product_attention` picks on `device` for
/// `heads` heads of `head_dim` over `seq` tokens in `kind`, with dropout
/// `dropout` and without a mask (`with_bias` false: a training block, no
/// padding) or with an additive bias (DeBERTa's relative positions): what its
/// dispatcher (`_fused_sdp_choice`) decides for these inputs.
pub fn sdpa_kernel(
    device: Device,
    kind: Kind,
    heads: i64,
    seq: i64,
    head_dim: i64,
    with_bias: bool,
    dropout: f64,
) -> &'static str {
    let q = Tensor::zeros([1, heads, seq, head_dim], (kind, device));
    let bias = with_bias.then(|| Tensor::zeros([1, 1, seq, seq], (kind, device)));
    match Tensor::f_internal_fused_sdp_choice(&q, &q, &q, bias.as_ref(), dropout, false, None, false) {
        Ok(0) => "math (unfused)",
        Ok(1) => "flash attention",
        Ok(2) => "memory-efficient attention",
        Ok(3) => "cuDNN attention",
        Ok(4) => "an overriding backend",
        _ => "none (no kernel takes these inputs)",
    }
}

/// Whose dropout runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropoutRoute {
    /// The mask of `mlm_kernels::dropout` (a counter-based hash filled in
    /// parallel, where libtorch's CPU `bernoulli_` is one serial loop),
    /// multiplied in as a tensor of the activations' dtype, which backward keeps.
    CpuMask,
    /// libtorch's dropout: on a GPU its fused kernel, which keeps a bool mask.
    Libtorch,
}

/// The dropout of probability `p` (in (0, 1]) over activations of `kind` on
/// `device`: ours on the CPU for fp32, bf16 and fp64 with `p < 1`, libtorch's
/// elsewhere (and for `p = 1`, which zeroes everything).
pub fn dropout_route(device: Device, kind: Kind, p: f64) -> DropoutRoute {
    if device == Device::Cpu && p < 1.0 && matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Double) {
        DropoutRoute::CpuMask
    } else {
        DropoutRoute::Libtorch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp16_and_bf16_on_a_cpu_without_bf16_instructions_go_through_fp32() {
        assert!(!gemm_via_f32(Device::Cpu, Kind::Float));
        assert!(!gemm_via_f32(Device::Cuda(0), Kind::BFloat16));
        assert_eq!(gemm_via_f32(Device::Cpu, Kind::BFloat16), !cpu_has_bf16_dot());
        assert!(gemm_via_f32(Device::Cpu, Kind::Half) && !gemm_via_f32(Device::Cuda(0), Kind::Half));
        let bf16 = if cpu_has_bf16_dot() { Kind::BFloat16 } else { Kind::Float };
        assert_eq!(attention_matmul_kind(Device::Cpu, Kind::BFloat16), bf16);
        assert_eq!(attention_matmul_kind(Device::Cpu, Kind::Half), Kind::Float);
        assert_eq!(attention_matmul_kind(Device::Cpu, Kind::Float), Kind::Float);
    }

    #[test]
    fn attention_is_written_out_only_on_the_cpu() {
        use {Attention::*, AttentionPath::*};
        let cpu = Device::Cpu;
        assert_eq!(attention_path(Plain, cpu, Kind::Float, 0.1), WrittenOut);
        assert_eq!(attention_path(Plain, cpu, Kind::BFloat16, 0.1), WrittenOut);
        assert_eq!(attention_path(Plain, cpu, Kind::Float, 0.0), Sdpa);
        assert_eq!(attention_path(Plain, cpu, Kind::Half, 0.1), Sdpa);
        assert_eq!(attention_path(Disentangled, cpu, Kind::Float, 0.0), WrittenOut);
        assert_eq!(attention_path(Disentangled, cpu, Kind::BFloat16, 0.1), WrittenOut);
        for attention in [Plain, Disentangled] {
            assert_eq!(attention_path(attention, Device::Cuda(0), Kind::BFloat16, 0.1), Sdpa);
        }
        // libtorch's CPU dispatcher takes its flash kernel for attention without a mask.
        assert_eq!(sdpa_kernel(cpu, Kind::Float, 2, 128, 64, false, 0.0), "flash attention");
    }

    #[test]
    fn our_dropout_runs_on_the_cpu_in_floating_dtypes_below_one() {
        use DropoutRoute::*;
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
            assert_eq!(dropout_route(Device::Cpu, kind, 0.1), CpuMask);
            assert_eq!(dropout_route(Device::Cpu, kind, 1.0), Libtorch);
            assert_eq!(dropout_route(Device::Cuda(0), kind, 0.1), Libtorch);
        }
        assert_eq!(dropout_route(Device::Cpu, Kind::Half, 0.1), Libtorch);
    }
}
