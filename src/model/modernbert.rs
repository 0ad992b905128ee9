//! ModernBERT with its masked-language-model head.
//!
//! Warner, Chaffin, Clavié, Weller, Hallström, Taghadouini, Gallagher, Biswas,
//! Ladhak, Aarsen, Cooper, Adams, Howard, Poli: "Smarter, Better, Faster,
//! Longer: A Modern Bidirectional Encoder for Fast, Memory Efficient, and Long
//! Context Finetuning and Inference" (arXiv:2412.13663).
//! Matches `transformers.ModernBertForMaskedLM` (5.x): token embeddings and a
//! LayerNorm (no position embeddings), pre-LayerNorm layers (the first without
//! its attention norm) whose attention applies rotary position embeddings to
//! the queries and keys, every `global_attn_every_n_layers`-th layer over the
//! whole block ("full_attention", `rope_theta` 160,000) and the others within a
//! sliding window of `local_attention / 2` tokens on each side
//! ("sliding_attention", `rope_theta` 10,000), a GeGLU feed-forward (`Wi` gives
//! the input and the gate), a final LayerNorm, then the head (dense, act,
//! LayerNorm) and a decoder tied to the token embeddings with its own bias.
//! Norms and projections have biases only where `norm_bias`, `attention_bias`,
//! `mlp_bias`, `classifier_bias` and `decoder_bias` say so.
//!
//! The sliding window is a band of the attention bias, passed to the same
//! attention as every other model (`layers::attention`: SDPA or the scores
//! written out, as the policy says). A training block has no padding: the
//! global layers then run without a mask, and a window that covers the whole
//! block is no mask either. Hugging Face unpads batches; a padded batch here
//! masks the pads instead, which gives the same outputs at every token.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::layers::{additive_mask, attention, dropout, finfo_min, trunc_normal, Activation};
use super::linear_f32;
use super::policy::Attention;
use super::qkv::QkvProjection;
use super::shape::{Layout, ModelShape, ModernLayers};
use super::spec::{ArchSpec, Encoder, LayerInputs, NameMap, Objective};

/// `ModernBertConfig`: the keys of `config.json` this model reads, with HF's
/// defaults. The attention pattern and rotary bases come in either of the two
/// forms that exist (see [`ModernBertConfig::layer_kinds`] and
/// [`ModernBertConfig::rope_thetas`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModernBertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub hidden_activation: String,
    pub max_position_embeddings: i64,
    pub initializer_range: f64,
    pub initializer_cutoff_factor: Option<f64>,
    pub norm_eps: f64,
    pub norm_bias: bool,
    pub pad_token_id: Option<i64>,
    pub attention_bias: bool,
    pub attention_dropout: f64,
    pub embedding_dropout: f64,
    pub mlp_bias: bool,
    pub mlp_dropout: f64,
    pub decoder_bias: bool,
    pub classifier_bias: bool,
    pub classifier_activation: String,
    /// The window of a sliding-attention layer: `local_attention / 2` tokens on each side.
    pub local_attention: i64,
    /// The Hub's form: layer `i` is global when `i % n == 0`.
    pub global_attn_every_n_layers: Option<i64>,
    /// The Hub's form of the rotary bases.
    pub global_rope_theta: Option<f64>,
    pub local_rope_theta: Option<f64>,
    /// `transformers` 5's form: `"full_attention"` / `"sliding_attention"` per layer.
    pub layer_types: Option<Vec<String>>,
    /// `transformers` 5's form: `{"full_attention": {"rope_type": "default",
    /// "rope_theta": ..}, "sliding_attention": {..}}`.
    pub rope_parameters: Option<serde_json::Value>,
    /// Refused unless absent or null (no scaled rotary embeddings).
    pub rope_scaling: Option<serde_json::Value>,
    /// Refused unless `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
}

impl Default for ModernBertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50368,
            hidden_size: 768,
            intermediate_size: 1152,
            num_hidden_layers: 22,
            num_attention_heads: 12,
            hidden_activation: "gelu".into(),
            max_position_embeddings: 8192,
            initializer_range: 0.02,
            initializer_cutoff_factor: Some(2.0),
            norm_eps: 1e-5,
            norm_bias: false,
            pad_token_id: Some(50283),
            attention_bias: false,
            attention_dropout: 0.0,
            embedding_dropout: 0.0,
            mlp_bias: false,
            mlp_dropout: 0.0,
            decoder_bias: true,
            classifier_bias: false,
            classifier_activation: "gelu".into(),
            local_attention: 128,
            global_attn_every_n_layers: None,
            global_rope_theta: None,
            local_rope_theta: None,
            layer_types: None,
            rope_parameters: None,
            rope_scaling: None,
            head_dim: None,
        }
    }
}

/// HF's `default_theta`.
const GLOBAL_THETA: f64 = 160_000.0;
const LOCAL_THETA: f64 = 10_000.0;

impl ModernBertConfig {
    /// Whether each layer attends over a sliding window (`true`) or the whole
    /// block: `layer_types` where given, else every `global_attn_every_n_layers`-th
    /// layer (default 3) global, starting with the first.
    pub fn layer_kinds(&self) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers.max(0) as usize;
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                bail!("layer_types in config.json has {} entries but num_hidden_layers is {n}", types.len());
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => bail!(
                        "layer_types entry {other:?} in config.json is not supported (full_attention, sliding_attention)"
                    ),
                })
                .collect();
        }
        let every = self.global_attn_every_n_layers.unwrap_or(3);
        if every < 1 {
            bail!("global_attn_every_n_layers = {every} in config.json must be at least 1");
        }
        Ok((0..n).map(|i| i as i64 % every != 0).collect())
    }

    /// The rotary bases `[global, local]`: `rope_parameters[kind].rope_theta`
    /// where given, else `global_rope_theta` / `local_rope_theta`, else HF's
    /// defaults (160,000 and 10,000).
    pub fn rope_thetas(&self) -> Result<[f64; 2]> {
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("rope_scaling in config.json is not supported (only plain rotary embeddings)");
        }
        let mut out = [self.global_rope_theta.unwrap_or(GLOBAL_THETA), self.local_rope_theta.unwrap_or(LOCAL_THETA)];
        let Some(params) = self.rope_parameters.as_ref().filter(|v| !v.is_null()) else { return Ok(out) };
        let Some(params) = params.as_object() else {
            bail!("rope_parameters in config.json must be an object keyed by full_attention / sliding_attention");
        };
        for (key, entry) in params {
            let slot = match key.as_str() {
                "full_attention" => 0,
                "sliding_attention" => 1,
                other => {
                    bail!("rope_parameters.{other} in config.json is not supported (full_attention, sliding_attention)")
                }
            };
            if entry.is_null() {
                continue;
            }
            let Some(entry) = entry.as_object() else {
                bail!("rope_parameters.{key} in config.json must be an object")
            };
            for (k, v) in entry {
                match k.as_str() {
                    "rope_type" if v.as_str() == Some("default") => {}
                    "rope_type" => bail!(
                        "rope_parameters.{key}.rope_type = {v} in config.json is not supported (only \"default\")"
                    ),
                    "rope_theta" => match v.as_f64() {
                        Some(t) if t.is_finite() && t > 0.0 => out[slot] = t,
                        _ => bail!("rope_parameters.{key}.rope_theta = {v} in config.json must be a positive number"),
                    },
                    "partial_rotary_factor" if v.as_f64() == Some(1.0) => {}
                    other => bail!("rope_parameters.{key}.{other} in config.json is not supported"),
                }
            }
        }
        Ok(out)
    }

    fn head_size(&self) -> i64 {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Refuses what this model does not compute, naming the key; returns the
    /// feed-forward and head activations.
    pub(super) fn validate(&self) -> Result<(Activation, Activation)> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} in config.json is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if self.head_size() % 2 != 0 {
            bail!(
                "hidden_size / num_attention_heads = {} in config.json must be even (rotary embeddings rotate pairs)",
                self.head_size()
            );
        }
        if let Some(d) = self.head_dim.filter(|&d| d != self.head_size()) {
            bail!("head_dim = {d} in config.json is not supported (only hidden_size / num_attention_heads)");
        }
        if self.local_attention < 1 {
            bail!("local_attention = {} in config.json must be at least 1", self.local_attention);
        }
        for (key, p) in [
            ("attention_dropout", self.attention_dropout),
            ("embedding_dropout", self.embedding_dropout),
            ("mlp_dropout", self.mlp_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                bail!("{key} = {p} in config.json must be a probability in [0, 1)");
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            bail!("norm_eps = {} in config.json must be a finite positive number", self.norm_eps);
        }
        if let Some(c) = self.initializer_cutoff_factor.filter(|c| !(c.is_finite() && *c > 0.0)) {
            bail!("initializer_cutoff_factor = {c} in config.json must be a finite positive number");
        }
        if let Some(pad) = self.pad_token_id.filter(|p| !(0..self.vocab_size).contains(p)) {
            bail!("pad_token_id {pad} in config.json must be a token id below vocab_size {}", self.vocab_size);
        }
        self.layer_kinds()?;
        self.rope_thetas()?;
        let act = Activation::parse(&self.hidden_activation).context("hidden_activation")?;
        let head_act = Activation::parse(&self.classifier_activation).context("classifier_activation")?;
        Ok((act, head_act))
    }

    /// HF's `_init_weights` stds: `in` for embeddings and the input
    /// projections, `out` (scaled by depth) for the output projections, the
    /// head's dense and the decoder; weights drawn from a normal truncated at
    /// `initializer_cutoff_factor` (default 2; 3 when null) stds.
    fn init(&self) -> (f64, f64, f64) {
        let std_in = self.initializer_range;
        let std_out = self.initializer_range / (2.0 * self.num_hidden_layers as f64).sqrt();
        (std_in, std_out, self.initializer_cutoff_factor.unwrap_or(3.0))
    }
}

/// `nn.Linear` with an optional bias, trunc-normal initialised.
#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Dense {
    fn new(p: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, std: f64, cutoff: f64) -> Self {
        Self {
            weight: trunc_normal(p, "weight", &[out_dim, in_dim], std, cutoff),
            bias: bias.then(|| p.zeros("bias", &[out_dim])),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        linear_f32::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `nn.LayerNorm(dim, eps, bias=norm_bias)`.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    fn new(p: &nn::Path, dim: i64, c: &ModernBertConfig) -> Self {
        Self { weight: p.ones("weight", &[dim]), bias: c.norm_bias.then(|| p.zeros("bias", &[dim])), eps: c.norm_eps }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(self.weight.size(), Some(&self.weight), self.bias.as_ref(), self.eps, true)
    }
}

/// The rotary tables of one base for `s` positions: `(cos, sin)`, each
/// [1, s, 1, head_dim] in `kind` (HF computes them in fp32 and casts them to
/// the activations' dtype), to broadcast over [b, s, heads, head_dim].
fn rotary_tables(theta: f64, s: i64, head_dim: i64, kind: Kind, device: tch::Device) -> [Tensor; 2] {
    let opts = (Kind::Float, device);
    // inv_freq = 1 / theta^(2i / d), in fp32 as HF's compute_default_rope_parameters.
    let exponents =
        Tensor::arange_start_step(0, head_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / head_dim as f64;
    let inv_freq = Tensor::from(theta as f32).to_device(device).pow(&exponents).reciprocal();
    let freqs = Tensor::arange(s, opts).unsqueeze(1) * inv_freq.unsqueeze(0); // [s, d/2]
    let emb = Tensor::cat(&[&freqs, &freqs], -1).view([1, s, 1, head_dim]);
    [emb.cos().to_kind(kind), emb.sin().to_kind(kind)]
}

/// HF's `apply_rotary_pos_emb` on `x` [b, s, h] split into `heads`: in fp32,
/// `x cos + rotate_half(x) sin`, back to `x`'s dtype.
fn apply_rotary(x: &Tensor, tables: &[Tensor; 2], heads: i64) -> Tensor {
    let (b, s, h) = x.size3().expect("rotary input must be [batch, seq, hidden]");
    let d = h / heads;
    let xf = x.to_kind(Kind::Float).view([b, s, heads, d]);
    let rotated = Tensor::cat(&[-xf.narrow(-1, d / 2, d / 2), xf.narrow(-1, 0, d / 2)], -1);
    let out = &xf * &tables[0] + rotated * &tables[1];
    out.to_kind(x.kind()).view([b, s, h])
}

/// `model.embeddings`: token embeddings, LayerNorm, dropout.
#[derive(Debug)]
struct ModernBertEmbeddings {
    tok_embeddings: Tensor,
    norm: Norm,
    padding_idx: i64,
    dropout: f64,
}

impl ModernBertEmbeddings {
    fn new(p: &nn::Path, c: &ModernBertConfig) -> Self {
        let (std, _, cutoff) = c.init();
        Self {
            // HF's init draws every row, the padding one too.
            tok_embeddings: trunc_normal(
                &(p / "tok_embeddings"),
                "weight",
                &[c.vocab_size, c.hidden_size],
                std,
                cutoff,
            ),
            norm: Norm::new(&(p / "norm"), c.hidden_size, c),
            padding_idx: c.pad_token_id.unwrap_or(-1),
            dropout: c.embedding_dropout,
        }
    }

    /// `input_ids` [b, s] -> [b, s, h]. The padding row gets no gradient from
    /// the lookup (`nn.Embedding(padding_idx=pad_token_id)`).
    fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let x = Tensor::embedding(&self.tok_embeddings, input_ids, self.padding_idx, false, false);
        dropout(&self.norm.forward(&x), self.dropout, train)
    }
}

/// `model.layers.N`: (attn_norm), attention with rotary embeddings, residual;
/// mlp_norm, GeGLU feed-forward, residual.
#[derive(Debug)]
struct ModernBertLayer {
    /// `None` in the first layer (HF's `nn.Identity`).
    attn_norm: Option<Norm>,
    wqkv: Dense,
    attn_wo: Dense,
    mlp_norm: Norm,
    wi: Dense,
    mlp_wo: Dense,
    /// A sliding-window layer (else global).
    local: bool,
    heads: i64,
    act: Activation,
    attention_dropout: f64,
    mlp_dropout: f64,
}

impl ModernBertLayer {
    fn new(p: &nn::Path, c: &ModernBertConfig, i: i64, local: bool, act: Activation) -> Self {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let (std_in, std_out, cutoff) = c.init();
        let (a, m) = (p / "attn", p / "mlp");
        Self {
            attn_norm: (i > 0).then(|| Norm::new(&(p / "attn_norm"), h, c)),
            wqkv: Dense::new(&(&a / "Wqkv"), h, 3 * h, c.attention_bias, std_in, cutoff),
            attn_wo: Dense::new(&(&a / "Wo"), h, h, c.attention_bias, std_out, cutoff),
            mlp_norm: Norm::new(&(p / "mlp_norm"), h, c),
            wi: Dense::new(&(&m / "Wi"), h, 2 * f, c.mlp_bias, std_in, cutoff),
            mlp_wo: Dense::new(&(&m / "Wo"), f, h, c.mlp_bias, std_out, cutoff),
            local,
            heads: c.num_attention_heads,
            act,
            attention_dropout: c.attention_dropout,
            mlp_dropout: c.mlp_dropout,
        }
    }

    /// `x` [b, s, h] -> [b, s, h]
    fn forward(&self, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        let normed = self.attn_norm.as_ref().map(|n| n.forward(x));
        let qkv = self.wqkv.forward(normed.as_ref().unwrap_or(x)); // [b, s, 3h]: q, k, v
        let [q, k, v]: [Tensor; 3] = qkv.chunk(3, -1).try_into().expect("three projections");
        let kind = usize::from(self.local);
        let tables = &inputs.rotary[kind];
        let (q, k) = (apply_rotary(&q, tables, self.heads), apply_rotary(&k, tables, self.heads));
        let mask = if self.local { inputs.window_mask.as_ref() } else { inputs.mask.as_ref() };
        let p = if train { self.attention_dropout } else { 0.0 };
        let ctx = attention(&q, &k, &v, mask, self.heads, p);
        let x = x + dropout(&self.attn_wo.forward(&ctx), self.attention_dropout, train);
        let [input, gate]: [Tensor; 2] =
            self.wi.forward(&self.mlp_norm.forward(&x)).chunk(2, -1).try_into().expect("input and gate");
        let y = dropout(&(self.act.forward(&input) * gate), self.mlp_dropout, train);
        x + self.mlp_wo.forward(&y)
    }
}

/// `head`: dense, activation, LayerNorm; then `decoder` (tied weight, own bias).
#[derive(Debug)]
struct ModernBertHead {
    dense: Dense,
    act: Activation,
    norm: Norm,
    decoder_bias: Option<Tensor>,
}

/// `ModernBertForMaskedLM`: `model.embeddings`, `model.layers.*`,
/// `model.final_norm`, `head`, `decoder`.
#[derive(Debug)]
pub struct ModernBertForMaskedLM {
    pub config: ModernBertConfig,
    embeddings: ModernBertEmbeddings,
    layers: Vec<ModernBertLayer>,
    final_norm: Norm,
    head: ModernBertHead,
    /// Rotary bases: global, local.
    thetas: [f64; 2],
}

impl ModernBertForMaskedLM {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: ModernBertConfig) -> Result<Self> {
        let (act, head_act) = config.validate()?;
        let kinds = config.layer_kinds()?;
        let thetas = config.rope_thetas()?;
        let (_, std_out, cutoff) = config.init();
        let model = root / "model";
        let layers = kinds
            .iter()
            .enumerate()
            .map(|(i, &local)| ModernBertLayer::new(&(&model / "layers" / i), &config, i as i64, local, act))
            .collect();
        let h = config.hidden_size;
        let head = ModernBertHead {
            dense: Dense::new(&(root / "head" / "dense"), h, h, config.classifier_bias, std_out, cutoff),
            act: head_act,
            norm: Norm::new(&(root / "head" / "norm"), h, &config),
            decoder_bias: config.decoder_bias.then(|| (root / "decoder").zeros("bias", &[config.vocab_size])),
        };
        Ok(Self {
            embeddings: ModernBertEmbeddings::new(&(&model / "embeddings"), &config),
            layers,
            final_norm: Norm::new(&(&model / "final_norm"), h, &config),
            head,
            thetas,
            config,
        })
    }

    /// The sliding-window layers' additive bias: 0 where `|query - key| <=
    /// local_attention / 2` and the key is a token, the dtype's most negative
    /// value elsewhere; [1 or b, 1, s, s]. `None` when the window covers the
    /// whole block and nothing is padded (the global layers' `None`).
    fn window_mask(&self, s: i64, pad: Option<&Tensor>, kind: Kind, device: tch::Device) -> Option<Tensor> {
        let half = self.config.local_attention / 2;
        if s - 1 <= half {
            return pad.map(Tensor::shallow_clone);
        }
        let idx = Tensor::arange(s, (Kind::Int64, device));
        let outside = (idx.unsqueeze(1) - idx.unsqueeze(0)).abs().gt(half).view([1, 1, s, s]);
        let outside = match pad {
            // `pad` is 0 at tokens, the most negative value at pads: [b, 1, 1, s].
            Some(p) => outside.logical_or(&p.ne(0.0)),
            None => outside,
        };
        Some(Tensor::zeros(outside.size(), (kind, device)).masked_fill(&outside, finfo_min(kind)))
    }
}

impl Encoder for ModernBertForMaskedLM {
    /// `input_ids`, `attention_mask` [b, s] -> the embeddings [b, s, h], the
    /// masks of the global and the sliding-window layers, and both rotary tables.
    fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs) {
        let x = self.embeddings.forward(input_ids, train);
        let (s, kind, device) = (input_ids.size()[1], x.kind(), x.device());
        let mask = attention_mask.and_then(|m| additive_mask(m, kind));
        let window_mask = self.window_mask(s, mask.as_ref(), kind, device);
        let d = self.config.head_size();
        let rotary = self.thetas.iter().map(|&theta| rotary_tables(theta, s, d, kind, device)).collect();
        (x, LayerInputs { mask, window_mask, rotary, ..Default::default() })
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`; the last one ends with `model.final_norm`, so that the
    /// stages' output is HF's `last_hidden_state`.
    fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        let y = self.layers[i].forward(x, inputs, train);
        if i + 1 == self.layers.len() {
            self.final_norm.forward(&y)
        } else {
            y
        }
    }

    /// `hidden` [..., h] -> logits [..., vocab]
    fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        let head = &self.head;
        let x = head.norm.forward(&head.act.forward(&head.dense.forward(hidden)));
        linear_f32::linear(&x, &self.embeddings.tok_embeddings, head.decoder_bias.as_ref())
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    /// None to fuse: `Wqkv` is one projection already.
    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection> {
        Vec::new()
    }
}

/// ModernBERT's entry in the registry (`ARCHITECTURES`, `mod.rs`).
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "modernbert",
    mlm_class: "ModernBertForMaskedLM",
    class_prefix: "ModernBert",
    names: NameMap { prefix: "model", aliases: &[], ignored: &["decoder.weight"] },
    build,
    shape,
    saved_flags: &[],
    objective: Objective::Mlm,
};

fn read(config: &serde_json::Value) -> Result<ModernBertConfig> {
    serde_json::from_value(config.clone()).context("reading ModernBERT config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(ModernBertForMaskedLM::new(root, read(config)?)?))
}

/// The sizes of the MLM model of a `config.json`.
fn shape(config: &serde_json::Value) -> Result<ModelShape> {
    let c = read(config)?;
    c.validate()?;
    let u = |x: i64| x.max(0) as u64;
    let (v, h, f, l) = (u(c.vocab_size), u(c.hidden_size), u(c.intermediate_size), u(c.num_hidden_layers));
    let norm = h + if c.norm_bias { h } else { 0 };
    let (ab, mb) = (u64::from(c.attention_bias), u64::from(c.mlp_bias));
    let layer = (3 * h * h + 3 * h * ab) + (h * h + h * ab) + (2 * h * f + 2 * f * mb) + (f * h + h * mb) + 2 * norm;
    let head = h * h + h * u64::from(c.classifier_bias) + norm + if c.decoder_bias { v } else { 0 };
    // The embeddings' norm and the final norm, less the first layer's missing attention norm: one norm.
    let parameters = v * h + l * layer + norm + head;
    Ok(ModelShape {
        model_type: SPEC.model_type,
        layout: Layout::Encoder,
        attention: Attention::Plain,
        vocab: v,
        hidden: h,
        layers: l,
        heads: u(c.num_attention_heads),
        intermediate: f,
        embedding: h,
        hidden_dropout: c.embedding_dropout,
        attention_dropout: c.attention_dropout,
        attention_output_dropout: c.attention_dropout > 0.0,
        relative: None,
        conv: false,
        parameters,
        word_embedding_parameters: v * h,
        modern: Some(ModernLayers {
            layer_parameters: layer,
            mlp_dropout: c.mlp_dropout,
            windowed: c.layer_kinds()?.iter().any(|&local| local),
        }),
    })
}

#[cfg(test)]
mod tests;
