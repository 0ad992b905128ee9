//! Building blocks shared by the encoders: `nn.Linear`, `nn.LayerNorm`,
//! `nn.Embedding`, the activation table (HF's `ACT2FN`) and multi-head attention
//! through libtorch's `scaled_dot_product_attention`.
//!
//! Each block creates its parameters under the `nn::Path` it is given, with the
//! initialisation of `PreTrainedModel._init_weights`: normal(0, initializer_range)
//! for Linear and Embedding weights, zero biases, LayerNorm weight 1 and bias 0.
use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

/// `nn.Linear(in, out)`: `weight` [out, in], `bias` [out].
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64, std: f64) -> Self {
        Self { weight: p.randn("weight", &[out_dim, in_dim], 0.0, std), bias: p.zeros("bias", &[out_dim]) }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
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
        let weight = p.randn("weight", &[num, dim], 0.0, std);
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
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            other => bail!(
                "activation {other:?} in config.json is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)"
            ),
        })
    }

    pub fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Relu => x.relu(),
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

/// The kernel libtorch's `scaled_dot_product_attention` picks on `device` for
/// `heads` heads of `head_dim` over `seq` tokens in `kind`, with dropout
/// `dropout` and without a mask (`with_bias` false: a training block, no
/// padding) or with an additive bias (DeBERTa's relative positions): what its
/// dispatcher (`_fused_sdp_choice`) decides for these inputs.
pub fn sdpa_kernel(
    device: tch::Device,
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
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>, heads: i64, dropout: f64) -> Tensor {
    let (b, s, h) = q.size3().expect("attention input must be [batch, seq, hidden]");
    let split = |x: &Tensor| x.view([b, s, heads, h / heads]).transpose(1, 2); // [b, heads, s, d]
    let out = Tensor::scaled_dot_product_attention(&split(q), &split(k), &split(v), bias, dropout, false, None, false);
    out.transpose(1, 2).contiguous().view([b, s, h])
}
