//! GPT-2 (and DistilGPT2, a GPT-2 with fewer layers) with its language-model
//! head: a decoder trained to predict the next token (`Objective::Clm`).
//!
//! Radford, Wu, Child, Luan, Amodei, Sutskever: "Language Models are
//! Unsupervised Multitask Learners" (OpenAI, 2019).
//! Matches `transformers.GPT2LMHeadModel`: learned positions `wpe` added to the
//! token embeddings `wte`, pre-LayerNorm blocks (`ln_1` -> causal attention ->
//! residual, `ln_2` -> MLP -> residual), a final `ln_f`, and the head
//! `lm_head` tied to `transformer.wte.weight` without a bias. The projections
//! are HF's `Conv1D`: a linear layer whose weight is stored `[in, out]`, kept so
//! here, so that saving stays a plain dump of HF's names. The fused `c_attn`
//! gives q, k and v at once.
//!
//! `ln_f` belongs to the head here ([`Encoder::mlm_head`]): the trainer applies
//! the head to the positions it predicts only, and `ln_f` is per position.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::layers::{causal_attention, causal_padding_bias, dropout, normal, Activation, Embedding, LayerNorm};
use super::linear_f32;
use super::policy::Attention;
use super::qkv::QkvProjection;
use super::shape::{encoder_layer_parameters, Layout, ModelShape};
use super::spec::{ArchSpec, Encoder, KvCache, LayerInputs, NameMap, Objective};

/// `GPT2Config`: the keys of `config.json` this model reads, with HF's defaults.
/// Other keys (`bos_token_id`, `summary_*`, ...) are kept by
/// `MaskedLm::config_json` and written back untouched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Gpt2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    /// The MLP's inner width; `None`: `4 * n_embd`.
    pub n_inner: Option<i64>,
    pub activation_function: String,
    pub resid_pdrop: f64,
    pub embd_pdrop: f64,
    pub attn_pdrop: f64,
    pub layer_norm_epsilon: f64,
    pub initializer_range: f64,
    /// false: the scores are q k^T, not divided by sqrt(head_dim).
    pub scale_attn_weights: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    /// Refused when true.
    pub add_cross_attention: bool,
    /// Refused when true.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Refused when true.
    pub reorder_and_upcast_attn: bool,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            tie_word_embeddings: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            add_cross_attention: false,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
        }
    }
}

impl Gpt2Config {
    /// The MLP's inner width: `n_inner`, or `4 * n_embd`.
    pub fn inner(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub(super) fn validate(&self) -> Result<Activation> {
        for (key, set) in [
            ("add_cross_attention", self.add_cross_attention),
            ("scale_attn_by_inverse_layer_idx", self.scale_attn_by_inverse_layer_idx),
            ("reorder_and_upcast_attn", self.reorder_and_upcast_attn),
        ] {
            if set {
                bail!("{key} = true in config.json is not supported by GPT-2 here (only false)");
            }
        }
        if !self.tie_word_embeddings {
            bail!(
                "tie_word_embeddings = false in config.json is not supported: GPT-2's lm_head is tied to \
                 transformer.wte"
            );
        }
        if self.n_head <= 0 || self.n_embd % self.n_head != 0 {
            bail!("n_embd {} in config.json is not a multiple of n_head {}", self.n_embd, self.n_head);
        }
        Activation::parse(&self.activation_function).context("activation_function in config.json")
    }
}

/// HF's `Conv1D(out, in)`: `x @ weight + bias` with `weight` [in, out] (an
/// `nn.Linear` stored transposed). The product is the shared linear route
/// ([`linear_f32::linear`]) on the transposed view, whose gradient autograd
/// transposes back onto `weight`.
#[derive(Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn new(p: &nn::Path, in_dim: i64, out_dim: i64, std: f64) -> Self {
        Self { weight: normal(p, "weight", &[in_dim, out_dim], std), bias: p.zeros("bias", &[out_dim]) }
    }

    /// `x` [..., in] -> [..., out]
    fn forward(&self, x: &Tensor) -> Tensor {
        linear_f32::linear(x, &self.weight.tr(), Some(&self.bias))
    }
}

/// `transformer.h.N.attn`: fused `c_attn` (q, k, v), causal attention, `c_proj`.
#[derive(Debug)]
struct Gpt2Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    heads: i64,
    scale: f64,
    attention_dropout: f64,
    resid_dropout: f64,
}

impl Gpt2Attention {
    fn new(p: &nn::Path, c: &Gpt2Config) -> Self {
        let (h, std) = (c.n_embd, c.initializer_range);
        let head_dim = (h / c.n_head) as f64;
        Self {
            c_attn: Conv1D::new(&(p / "c_attn"), h, 3 * h, std),
            c_proj: Conv1D::new(&(p / "c_proj"), h, h, residual_std(c)),
            heads: c.n_head,
            scale: if c.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 },
            attention_dropout: c.attn_pdrop,
            resid_dropout: c.resid_pdrop,
        }
    }

    /// `x` [b, n, h], `bias` [b, 1, n, n] (`None`: causality alone), `cache`:
    /// this layer's keys and values of the `past` positions before these
    /// (decoding), to which these are appended -> [b, n, h]
    fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        cache: Option<(&mut Option<(Tensor, Tensor)>, i64)>,
    ) -> Tensor {
        let (b, n, h) = x.size3().expect("GPT-2 attention input must be [batch, seq, hidden]");
        let by_head = |t: &Tensor| t.view([b, n, self.heads, h / self.heads]).transpose(1, 2); // [b, heads, n, d]
        let qkv = self.c_attn.forward(x).split(h, -1);
        let (q, mut k, mut v) = (by_head(&qkv[0]), by_head(&qkv[1]), by_head(&qkv[2]));
        if let Some((entry, past)) = cache {
            (k, v) = append_to_cache(entry, past, &k, &v);
        }
        let p = if train { self.attention_dropout } else { 0.0 };
        let ctx = causal_attention(&q, &k, &v, bias, self.scale, p); // [b, heads, n, d]
        let ctx = ctx.transpose(1, 2).contiguous().view([b, n, h]);
        dropout(&self.c_proj.forward(&ctx), self.resid_dropout, train)
    }
}

/// Writes `k` and `v` [b, heads, n, d] after the `past` positions of a
/// layer's cache entry and returns the keys and values of all `past + n`
/// positions (views of the entry). The entry's buffers grow by doubling, so a
/// generated token copies its own keys and values, not the whole cache.
fn append_to_cache(entry: &mut Option<(Tensor, Tensor)>, past: i64, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
    let need = past + k.size()[2];
    if entry.as_ref().is_none_or(|(kb, _)| kb.size()[2] < need) {
        let mut size = k.size();
        size[2] = 2 * need;
        let grown = (
            Tensor::zeros(size.as_slice(), (k.kind(), k.device())),
            Tensor::zeros(size.as_slice(), (v.kind(), v.device())),
        );
        if let Some((k0, v0)) = entry.take() {
            grown.0.narrow(2, 0, past).copy_(&k0.narrow(2, 0, past));
            grown.1.narrow(2, 0, past).copy_(&v0.narrow(2, 0, past));
        }
        *entry = Some(grown);
    }
    let (kb, vb) = entry.as_ref().expect("allocated above");
    kb.narrow(2, past, k.size()[2]).copy_(k);
    vb.narrow(2, past, v.size()[2]).copy_(v);
    (kb.narrow(2, 0, need), vb.narrow(2, 0, need))
}

/// The scaled initialisation of the projections into the residual stream
/// (`c_proj` of attention and MLP): `initializer_range / sqrt(2 n_layer)`.
fn residual_std(c: &Gpt2Config) -> f64 {
    c.initializer_range / (2.0 * c.n_layer as f64).sqrt()
}

/// `transformer.h.N.mlp`: `c_fc`, activation, `c_proj`, dropout.
#[derive(Debug)]
struct Gpt2Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
    act: Activation,
    dropout: f64,
}

impl Gpt2Mlp {
    fn new(p: &nn::Path, c: &Gpt2Config, act: Activation) -> Self {
        let (h, f) = (c.n_embd, c.inner());
        Self {
            c_fc: Conv1D::new(&(p / "c_fc"), h, f, c.initializer_range),
            c_proj: Conv1D::new(&(p / "c_proj"), f, h, residual_std(c)),
            act,
            dropout: c.resid_pdrop,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        dropout(&self.c_proj.forward(&self.act.forward(&self.c_fc.forward(x))), self.dropout, train)
    }
}

/// `transformer.h.N`: pre-LayerNorm attention and MLP, each added to its input.
#[derive(Debug)]
struct Gpt2Block {
    ln_1: LayerNorm,
    attn: Gpt2Attention,
    ln_2: LayerNorm,
    mlp: Gpt2Mlp,
}

impl Gpt2Block {
    fn new(p: &nn::Path, c: &Gpt2Config, act: Activation) -> Self {
        let (h, eps) = (c.n_embd, c.layer_norm_epsilon);
        Self {
            ln_1: LayerNorm::new(&(p / "ln_1"), h, eps),
            attn: Gpt2Attention::new(&(p / "attn"), c),
            ln_2: LayerNorm::new(&(p / "ln_2"), h, eps),
            mlp: Gpt2Mlp::new(&(p / "mlp"), c, act),
        }
    }

    /// `x` [b, n, h] -> [b, n, h]; `bias` and `cache` as [`Gpt2Attention::forward`].
    fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        train: bool,
        cache: Option<(&mut Option<(Tensor, Tensor)>, i64)>,
    ) -> Tensor {
        let x = self.attn.forward(&self.ln_1.forward(x), bias, train, cache) + x;
        self.mlp.forward(&self.ln_2.forward(&x), train) + x
    }
}

/// `GPT2LMHeadModel`: `transformer.{wte, wpe, h.*, ln_f}`, `lm_head` tied to `wte`.
#[derive(Debug)]
pub struct Gpt2LmHeadModel {
    pub config: Gpt2Config,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Gpt2Block>,
    ln_f: LayerNorm,
}

impl Gpt2LmHeadModel {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: Gpt2Config) -> Result<Self> {
        let act = config.validate()?;
        let base = root / "transformer";
        let (h, std) = (config.n_embd, config.initializer_range);
        Ok(Self {
            wte: Embedding::new(&(&base / "wte"), config.vocab_size, h, std, None),
            wpe: Embedding::new(&(&base / "wpe"), config.n_positions, h, std, None),
            blocks: (0..config.n_layer).map(|i| Gpt2Block::new(&(&base / "h" / i), &config, act)).collect(),
            ln_f: LayerNorm::new(&(&base / "ln_f"), h, config.layer_norm_epsilon),
            config,
        })
    }

    /// `input_ids` [b, n] at positions `start..start + n` -> wte + wpe [b, n, h]
    fn embeddings(&self, input_ids: &Tensor, start: i64) -> Tensor {
        let n = input_ids.size()[1];
        let positions = Tensor::arange_start(start, start + n, (Kind::Int64, input_ids.device()));
        self.wte.forward(input_ids) + self.wpe.forward(&positions)
    }
}

impl Encoder for Gpt2LmHeadModel {
    /// `input_ids`, `attention_mask` [b, s] -> the embeddings [b, s, h] and the
    /// causal mask with the padding (`None` without padding: causality alone).
    /// Positions run 0..s whatever the padding, as HF's without `position_ids`.
    fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs) {
        let x = dropout(&self.embeddings(input_ids, 0), self.config.embd_pdrop, train);
        let mask = attention_mask.and_then(|m| causal_padding_bias(m, x.kind()));
        (x, LayerInputs { mask, ..Default::default() })
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        self.blocks[i].forward(x, inputs.mask.as_ref(), train, None)
    }

    /// `ln_f`, then the tied `lm_head`: `hidden` [..., h] -> logits [..., vocab]
    fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        linear_f32::linear(&self.ln_f.forward(hidden), &self.wte.weight, None)
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_positions(&self) -> i64 {
        self.config.n_positions
    }

    fn hidden_size(&self) -> i64 {
        self.config.n_embd
    }

    /// None: `c_attn` is already one fused projection.
    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection> {
        Vec::new()
    }

    /// The blocks over `input_ids` [b, n] at positions `cache.len..`, each
    /// block's keys and values appended to its cache entry -> [b, n, h] before `ln_f`.
    fn decode(&self, input_ids: &Tensor, cache: &mut KvCache) -> Option<Tensor> {
        if cache.layers.len() < self.blocks.len() {
            cache.layers.resize_with(self.blocks.len(), || None);
        }
        let mut x = self.embeddings(input_ids, cache.len);
        for (block, entry) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = block.forward(&x, None, false, Some((entry, cache.len)));
        }
        cache.len += input_ids.size()[1];
        Some(x)
    }
}

/// GPT-2's entry in the registry (`ARCHITECTURES`, `mod.rs`).
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "gpt2",
    mlm_class: "GPT2LMHeadModel",
    class_prefix: "GPT2",
    names: NAMES,
    build,
    shape,
    saved_flags: &[],
    objective: Objective::Clm,
};

/// How Hugging Face names GPT-2's weights. The Hub's `gpt2` and `distilgpt2`
/// files are `GPT2Model` state dicts (no `transformer.` prefix) that also hold
/// each layer's old causal-mask buffers `attn.bias` and `attn.masked_bias`.
const NAMES: NameMap =
    NameMap { prefix: "transformer", aliases: &[], ignored: &["lm_head.weight", "*.attn.bias", "*.attn.masked_bias"] };

/// HF's `GPT2Config.attribute_map`: the BERT names a `config.json` may give
/// GPT-2's sizes under.
const ALIASES: [(&str, &str); 4] = [
    ("hidden_size", "n_embd"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("max_position_embeddings", "n_positions"),
];

/// The config, a size given under its BERT name ([`ALIASES`]) read as
/// GPT-2's; both names with different values are refused.
fn read(config: &serde_json::Value) -> Result<Gpt2Config> {
    let mut config = config.clone();
    if let Some(keys) = config.as_object_mut() {
        for (alias, key) in ALIASES {
            let Some(value) = keys.get(alias).filter(|v| !v.is_null()).cloned() else { continue };
            match keys.get(key).filter(|v| !v.is_null()) {
                None => drop(keys.insert(key.into(), value)),
                Some(own) if *own == value => {}
                Some(own) => {
                    bail!("{alias} = {value} and {key} = {own} in config.json disagree (both set GPT-2's {key})")
                }
            }
        }
    }
    serde_json::from_value(config).context("reading GPT-2 config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(Gpt2LmHeadModel::new(root, read(config)?)?))
}

fn shape(config: &serde_json::Value) -> Result<ModelShape> {
    let c = read(config)?;
    c.validate()?;
    let u = |x: i64| x.max(0) as u64;
    let (v, h, f, layers) = (u(c.vocab_size), u(c.n_embd), u(c.inner()), u(c.n_layer));
    // A block has a BERT layer's parameters: q, k, v and output projections,
    // two LayerNorms, the MLP pair. The head's own: `ln_f`.
    Ok(ModelShape {
        model_type: SPEC.model_type,
        layout: Layout::Decoder,
        attention: Attention::Plain,
        vocab: v,
        hidden: h,
        layers,
        heads: u(c.n_head),
        intermediate: f,
        embedding: h,
        hidden_dropout: c.resid_pdrop,
        attention_dropout: c.attn_pdrop,
        attention_output_dropout: true,
        relative: None,
        conv: false,
        modern: None,
        parameters: (v + u(c.n_positions)) * h + layers * encoder_layer_parameters(h, f) + 2 * h,
        word_embedding_parameters: v * h,
    })
}

#[cfg(test)]
mod tests;
