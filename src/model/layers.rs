//! Building blocks shared by the encoders: `nn.Linear`, `nn.LayerNorm`,
//! `nn.Embedding`, the activation table (HF's `ACT2FN`), dropout and multi-head
//! attention, on the paths `policy.rs` picks.
//!
//! Each block creates its parameters under the `nn::Path` it is given, with the
//! initialisation of `PreTrainedModel._init_weights`: normal(0, initializer_range)
//! for Linear and Embedding weights, zero biases, LayerNorm weight 1 and bias 0.
use std::cell::Cell;

use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

use super::linear_f32;
use super::policy::{self, AttentionPath, DropoutRoute};

thread_local! {
    static RANDOM_INIT: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` (building a model) with the weights that would be drawn from
/// normal(0, std) created as zeros: for a model whose weights are overwritten
/// next (a copy in another dtype), so that building it costs no draws and
/// leaves libtorch's generator where it was.
pub fn without_random_init<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RANDOM_INIT.set(self.0);
        }
    }
    let _restore = Restore(RANDOM_INIT.replace(false));
    f()
}

/// A weight under `p` drawn from normal(0, `std`), unless [`without_random_init`] says zeros.
pub fn normal(p: &nn::Path, name: &str, dims: &[i64], std: f64) -> Tensor {
    if RANDOM_INIT.get() {
        p.randn(name, dims, 0.0, std)
    } else {
        p.zeros(name, dims)
    }
}

/// A weight under `p` drawn from normal(0, `std`) truncated to `[-cutoff std,
/// cutoff std]` (`torch.nn.init.trunc_normal_`'s inverse-CDF method: uniform
/// between the bounds' CDFs, through `erfinv`), unless
/// [`without_random_init`] says zeros.
pub fn trunc_normal(p: &nn::Path, name: &str, dims: &[i64], std: f64, cutoff: f64) -> Tensor {
    let t = p.zeros(name, dims);
    if RANDOM_INIT.get() {
        let cdf = |x: f64| (1.0 + libm_erf(x / std::f64::consts::SQRT_2)) / 2.0;
        let (lo, hi) = (cdf(-cutoff), cdf(cutoff));
        tch::no_grad(|| {
            let mut u = t.shallow_clone();
            let _ = u.uniform_(2.0 * lo - 1.0, 2.0 * hi - 1.0).erfinv_();
            let _ = u.g_mul_scalar_(std * std::f64::consts::SQRT_2).clamp_(-cutoff * std, cutoff * std);
        });
    }
    t
}

/// erf(x) of one scalar, through libtorch.
fn libm_erf(x: f64) -> f64 {
    Tensor::from(x).erf().double_value(&[])
}

/// `nn.Dropout(p)` in training (`train`), the identity otherwise: zeroes each
/// element with probability `p` and scales the rest by `1 / (1 - p)`, through
/// the route the policy picks ([`policy::dropout_route`]). Ours on the CPU: the
/// mask comes from [`mlm_kernels::dropout`] (vectorised and split across
/// threads, where libtorch's `bernoulli_` is one serial loop), keyed by one draw
/// of libtorch's CPU generator, so `tch::manual_seed` decides the masks as it
/// does libtorch's (a resumed job and a recomputed layer draw what they drew).
pub fn dropout(x: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 || x.numel() == 0 {
        return x.shallow_clone();
    }
    match policy::dropout_route(x.device(), x.kind(), p) {
        DropoutRoute::Libtorch => x.dropout(p, train),
        DropoutRoute::CpuMask => {
            let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0]) as u64;
            cpu_dropout(x, p, seed)
        }
    }
}

/// [`dropout`] on the CPU with the mask of `seed`, `p` in (0, 1).
fn cpu_dropout(x: &Tensor, p: f64, seed: u64) -> Tensor {
    let scale = 1.0 / (1.0 - p);
    let threshold = mlm_kernels::dropout::threshold(p);
    let mask = Tensor::empty(x.size(), (x.kind(), tch::Device::Cpu));
    let n = mask.numel();
    let ptr = mask.data_ptr();
    // SAFETY: `mask` is a fresh contiguous CPU tensor of `n` elements of its kind,
    // owned here; nothing else reads or writes it during the fill.
    unsafe {
        match x.kind() {
            Kind::Float => {
                let out = std::slice::from_raw_parts_mut(ptr as *mut u32, n);
                mlm_kernels::dropout::fill(seed, threshold, (scale as f32).to_bits(), 0, out);
            }
            Kind::BFloat16 => {
                let out = std::slice::from_raw_parts_mut(ptr as *mut u16, n);
                mlm_kernels::dropout::fill(seed, threshold, mlm_kernels::bf16::from_f32(scale as f32), 0, out);
            }
            Kind::Double => {
                let out = std::slice::from_raw_parts_mut(ptr as *mut u64, n);
                mlm_kernels::dropout::fill(seed, threshold, scale.to_bits(), 0, out);
            }
            _ => return x.dropout(p, true),
        }
    }
    x * mask
}

/// `nn.Linear(in, out)`: `weight` [out, in], `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64, std: f64) -> Self {
        Self { weight: normal(p, "weight", &[out_dim, in_dim], std), bias: p.zeros("bias", &[out_dim]) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        linear_f32::linear(x, &self.weight, Some(&self.bias))
    }

    /// The same tensors (not copies).
    pub fn shallow_clone(&self) -> Self {
        Self { weight: self.weight.shallow_clone(), bias: self.bias.shallow_clone() }
    }
}

/// `nn.LayerNorm(dim, eps)`.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        Self { weight: p.ones("weight", &[dim]), bias: p.zeros("bias", &[dim]), eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *self.weight.size().last().expect("LayerNorm weight is 1-d");
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// `nn.Embedding(num, dim, padding_idx)`; the padding row starts at zero, as HF does.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(p: &nn::Path, num: i64, dim: i64, std: f64, padding_idx: Option<i64>) -> Self {
        let weight = normal(p, "weight", &[num, dim], std);
        if let Some(pad) = padding_idx.filter(|&i| (0..num).contains(&i)) {
            tch::no_grad(|| {
                let _ = weight.get(pad).zero_();
            });
        }
        Self { weight }
    }

    /// `ids` [...] i64 -> [..., dim]
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// The activations of HF's `ACT2FN` that BERT-family configs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `"gelu"`: exact, erf-based.
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`: the tanh approximation.
    GeluTanh,
    Relu,
    /// `"tanh"` (the default `conv_act` of DeBERTa-v2's convolution).
    Tanh,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "tanh" => Self::Tanh,
            other => bail!(
                "activation {other:?} in config.json is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu, tanh)"
            ),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Relu => x.relu(),
            Self::Tanh => x.tanh(),
        }
    }
}

/// The additive attention bias of HF's sdpa path: 0 where `attention_mask` is 1,
/// the most negative finite value of `kind` where it is 0.
/// `attention_mask` [batch, seq] (any integer kind) -> [batch, 1, 1, seq] in `kind`.
///
/// `None` when a CPU mask has no padding (every training batch: chunks are
/// full), as transformers drops an all-ones mask for sdpa: the same result, and
/// attention without a bias to add. A GPU mask is not inspected, which would
/// cost a device-to-host sync per forward.
pub fn additive_mask(attention_mask: &Tensor, kind: Kind) -> Option<Tensor> {
    let (b, s) = attention_mask.size2().expect("attention_mask must be [batch, seq]");
    if attention_mask.device() == tch::Device::Cpu && attention_mask.ne(0).all().int64_value(&[]) != 0 {
        return None;
    }
    let masked = attention_mask.eq(0).view([b, 1, 1, s]);
    Some(Tensor::zeros([b, 1, 1, s], (kind, attention_mask.device())).masked_fill(&masked, finfo_min(kind)))
}

/// [`attention`] with the scores written out: q (scaled) k^T, the bias, softmax
/// in fp32, dropout on the fp32 probabilities, back to the matmuls' dtype
/// ([`policy::attention_matmul_kind`]) for the `bmm` with v.
/// -> [batch, seq, hidden] in q's dtype.
fn attention_written_out(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    heads: i64,
    dropout: f64,
) -> Tensor {
    let (b, s, h) = q.size3().expect("attention input must be [batch, seq, hidden]");
    let d = h / heads;
    let acc = policy::attention_matmul_kind(q.device(), q.kind());
    let by_head = |x: &Tensor| x.to_kind(acc).view([b, s, heads, d]).transpose(1, 2).reshape([b * heads, s, d]);
    let qh = by_head(q) * (1.0 / (d as f64).sqrt());
    let mut scores = qh.bmm(&by_head(k).transpose(1, 2)); // [b heads, s, s]
    if let Some(bias) = bias {
        scores = (scores.view([b, heads, s, s]) + bias).view([b * heads, s, s]);
    }
    // The scores go before the dropout's mask and product exist (without
    // autograd nothing else holds them).
    let probs = scores.softmax(-1, Kind::Float);
    drop(scores);
    let probs = self::dropout(&probs, dropout, dropout > 0.0).to_kind(acc);
    let ctx = probs.bmm(&by_head(v)); // [b heads, s, d]
    ctx.view([b, heads, s, d]).transpose(1, 2).to_kind(q.kind()).contiguous().view([b, s, h])
}

/// The most negative finite value of `kind` (HF's `torch.finfo(dtype).min`).
pub fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Multi-head scaled dot-product attention with separate q/k/v projections.
/// `q`, `k`, `v` [batch, seq, hidden] (already projected), `bias` [batch, 1, 1, seq]
/// or `None` -> [batch, seq, hidden].
///
/// The scores written out or libtorch's `scaled_dot_product_attention`, as
/// [`policy::attention_path`] says for [`policy::Attention::Plain`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, heads: i64, dropout: f64) -> Tensor {
    match policy::attention_path(policy::Attention::Plain, q.device(), q.kind(), dropout) {
        AttentionPath::WrittenOut => attention_written_out(q, k, v, bias, heads, dropout),
        AttentionPath::Sdpa => attention_sdpa(q, k, v, bias, heads, dropout),
    }
}

/// [`attention`] through libtorch's `scaled_dot_product_attention`.
fn attention_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, heads: i64, dropout: f64) -> Tensor {
    let (b, s, h) = q.size3().expect("attention input must be [batch, seq, hidden]");
    let split = |x: &Tensor| x.view([b, s, heads, h / heads]).transpose(1, 2); // [b, heads, s, d]
    let out = Tensor::scaled_dot_product_attention(&split(q), &split(k), &split(v), bias, dropout, false, None, false);
    out.transpose(1, 2).contiguous().view([b, s, h])
}

/// The additive causal mask of `n` queries that are the last `n` of `t`
/// positions: query i may see keys `0..=t - n + i`; the others get the most
/// negative finite value of `kind`. -> [n, t]
pub fn causal_bias(n: i64, t: i64, kind: Kind, device: tch::Device) -> Tensor {
    let future = Tensor::ones([n, t], (Kind::Bool, device)).triu(t - n + 1);
    Tensor::zeros([n, t], (kind, device)).masked_fill(&future, finfo_min(kind))
}

/// [`causal_bias`] with padding: `attention_mask` [b, s] (1 = token, 0 = pad)
/// -> [b, 1, s, s] in `kind`, a key masked when it lies ahead of the query or is
/// a pad (HF's causal mask). `None` when a CPU mask has no padding, as
/// [`additive_mask`].
pub fn causal_padding_bias(attention_mask: &Tensor, kind: Kind) -> Option<Tensor> {
    let (b, s) = attention_mask.size2().expect("attention_mask must be [batch, seq]");
    let device = attention_mask.device();
    if device == tch::Device::Cpu && attention_mask.ne(0).all().int64_value(&[]) != 0 {
        return None;
    }
    let future = Tensor::ones([s, s], (Kind::Bool, device)).triu(1).view([1, 1, s, s]);
    let hidden = future.logical_or(&attention_mask.eq(0).view([b, 1, 1, s]));
    Some(Tensor::zeros([b, 1, s, s], (kind, device)).masked_fill(&hidden, finfo_min(kind)))
}

/// Causal multi-head attention (GPT-2): `q` [b, heads, n, d], `k`, `v`
/// [b, heads, t, d] with t >= n, the queries being the last n of the t
/// positions (t > n: decoding after a key/value cache); `bias` [b, 1, n, t] an
/// additive mask that already holds causality ([`causal_padding_bias`]), or
/// `None` for causality alone; q k^T is multiplied by `scale`.
/// -> [b, heads, n, d] in q's dtype.
///
/// The scores written out or libtorch's SDPA (with `is_causal` when the
/// queries are all the positions), as [`policy::attention_path`] says for
/// [`policy::Attention::Plain`]: the same rule as bidirectional attention.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, scale: f64, dropout: f64) -> Tensor {
    let (n, t) = (q.size()[2], k.size()[2]);
    let causal = || causal_bias(n, t, q.kind(), q.device());
    match policy::attention_path(policy::Attention::Plain, q.device(), q.kind(), dropout) {
        AttentionPath::Sdpa => match bias {
            Some(bias) => Tensor::scaled_dot_product_attention(q, k, v, Some(bias), dropout, false, Some(scale), false),
            None if n == t => {
                Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, dropout, true, Some(scale), false)
            }
            None => Tensor::scaled_dot_product_attention(q, k, v, Some(causal()), dropout, false, Some(scale), false),
        },
        AttentionPath::WrittenOut => causal_attention_written_out(q, k, v, bias.unwrap_or(&causal()), scale, dropout),
    }
}

/// [`causal_attention`] with the scores written out: q k^T scaled, plus the
/// bias, softmax and its dropout in fp32, the matmuls in
/// [`policy::attention_matmul_kind`].
fn causal_attention_written_out(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64, dropout: f64) -> Tensor {
    let acc = policy::attention_matmul_kind(q.device(), q.kind());
    let scores = q.to_kind(acc).matmul(&k.to_kind(acc).transpose(-1, -2)) * scale + bias.to_kind(acc); // [b, heads, n, t]
    let probs = scores.softmax(-1, Kind::Float);
    drop(scores);
    let probs = self::dropout(&probs, dropout, dropout > 0.0).to_kind(acc);
    probs.matmul(&v.to_kind(acc)).to_kind(q.kind())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Output and the gradients of q, k and v under a fixed linear loss.
    fn run(f: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor, qkv: &[Tensor; 3]) -> Vec<Tensor> {
        let [q, k, v] = qkv.each_ref().map(|t| t.detach().set_requires_grad(true));
        let out = f(&q, &k, &v);
        let w = Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu)).view(out.size().as_slice());
        (out.to_kind(Kind::Float) * w).sum(Kind::Float).backward();
        vec![
            out.to_kind(Kind::Float),
            q.grad().to_kind(Kind::Float),
            k.grad().to_kind(Kind::Float),
            v.grad().to_kind(Kind::Float),
        ]
    }

    #[test]
    fn scores_written_out_equal_sdpa_in_outputs_and_gradients() {
        let g = |shape: [i64; 3], seed: f64| {
            (Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)) * seed).sin().view(shape)
        };
        let (b, s, h, heads) = (2, 5, 8, 2);
        let pad = Tensor::ones([b, s], (Kind::Int64, Device::Cpu));
        let _ = pad.get(1).narrow(0, 3, 2).fill_(0);
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::BFloat16, 3e-2)] {
            let qkv = [g([b, s, h], 0.37), g([b, s, h], 0.91), g([b, s, h], 1.53)].map(|t| t.to_kind(kind));
            for bias in [None, additive_mask(&pad, kind)] {
                let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| attention_sdpa(q, k, v, bias.as_ref(), heads, 0.0);
                let ours =
                    |q: &Tensor, k: &Tensor, v: &Tensor| attention_written_out(q, k, v, bias.as_ref(), heads, 0.0);
                for (i, (a, e)) in run(ours, &qkv).iter().zip(run(sdpa, &qkv)).enumerate() {
                    let diff = (a - &e).abs().max().double_value(&[]);
                    assert!(diff <= tol, "{kind:?} bias {} tensor {i}: max |diff| {diff:.3e}", bias.is_some());
                }
            }
        }
    }

    #[test]
    fn causal_attention_written_out_equals_sdpa_with_and_without_a_cache_or_padding() {
        let g = |shape: [i64; 4], seed: f64| {
            (Tensor::arange(shape.iter().product::<i64>(), (Kind::Float, Device::Cpu)) * seed).sin().view(shape)
        };
        let (b, heads, t, d) = (2, 2, 6, 4);
        let pad = Tensor::ones([b, t], (Kind::Int64, Device::Cpu));
        let _ = pad.get(1).narrow(0, 4, 2).fill_(0);
        let (q, k, v) = (g([b, heads, t, d], 0.37), g([b, heads, t, d], 0.91), g([b, heads, t, d], 1.53));
        for (n, bias) in [(t, None), (t, causal_padding_bias(&pad, Kind::Float)), (2, None), (1, None)] {
            let q = q.narrow(2, t - n, n);
            let plain = bias.is_none() && n > 1;
            let sdpa = causal_attention(&q, &k, &v, bias.as_ref(), 0.3, 0.0);
            let full = bias.unwrap_or_else(|| causal_bias(n, t, Kind::Float, Device::Cpu));
            let ours = causal_attention_written_out(&q, &k, &v, &full, 0.3, 0.0);
            let diff = (&sdpa - ours).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{n} queries: {diff:.3e}");
            if !plain {
                continue;
            }
            // Query i sees keys up to t - n + i: changing the last key changes no earlier query.
            let k2 = k.copy();
            let _ = k2.narrow(2, t - 1, 1).fill_(5.0);
            let moved = causal_attention(&q, &k2, &v, None, 0.3, 0.0);
            let early = (sdpa.narrow(2, 0, n - 1) - moved.narrow(2, 0, n - 1)).abs().max();
            assert_eq!(early.double_value(&[]), 0.0, "{n} queries");
        }
    }

    #[test]
    fn dropout_drops_p_and_rescales_the_rest_in_every_cpu_dtype() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Double] {
            let x = Tensor::ones([64, 1024], (kind, Device::Cpu)).set_requires_grad(true);
            let y = cpu_dropout(&x, 0.2, 3);
            let kept = y.ne(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            assert!((kept - 0.8).abs() < 0.01, "{kind:?}: kept {kept}");
            // The kept elements are scaled by 1 / (1 - p): the mean stays near 1.
            let mean = y.to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
            assert!((mean - 1.0).abs() < 0.02, "{kind:?}: mean {mean}");
            let off = (y.to_kind(Kind::Float) - 1.25).abs().gt(1e-2);
            assert_eq!(y.ne(0.0).logical_and(&off).any().int64_value(&[]), 0, "{kind:?}: kept but not 1 / (1 - p)");
            // Backward lets through what forward kept, with the same scale.
            y.sum(Kind::Float).backward();
            let g = x.grad();
            assert!(g.to_kind(Kind::Float).allclose(&y.to_kind(Kind::Float), 0.0, 0.0, false), "{kind:?}");
            // The seed decides the mask.
            assert!(cpu_dropout(&x, 0.2, 3).equal(&y) && !cpu_dropout(&x, 0.2, 4).equal(&y));
        }
        let x = Tensor::ones([8], (Kind::Float, Device::Cpu));
        assert!(dropout(&x, 0.5, false).equal(&x) && dropout(&x, 0.0, true).equal(&x));
        assert_eq!(dropout(&x, 1.0, true).abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn the_written_out_dropout_drops_and_rescales() {
        let q = Tensor::ones([1, 64, 8], (Kind::Float, Device::Cpu));
        let out = attention_written_out(&q, &q, &q, None, 2, 0.5);
        // Uniform attention over ones: each kept probability 1/64 becomes 2/64, so
        // an output is 2 x (kept keys) / 64: not all 1 (dropped), mean near 1.
        let mean = out.mean(Kind::Float).double_value(&[]);
        assert!(out.ne(1.0).any().int64_value(&[]) == 1 && (mean - 1.0).abs() < 0.2, "mean {mean}");
    }
}
