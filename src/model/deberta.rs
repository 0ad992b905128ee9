//! DeBERTa-v2 / DeBERTa-v3 with the masked-language-model head.
//!
//! He, Liu, Gao, Chen: "DeBERTa: Decoding-enhanced BERT with Disentangled Attention"
//! (ICLR 2021, arXiv:2006.03654); He, Gao, Chen: "DeBERTaV3: Improving DeBERTa using
//! ELECTRA-Style Pre-Training with Gradient-Disentangled Embedding Sharing"
//! (arXiv:2111.09543). Matches `transformers.DebertaV2ForMaskedLM`.
//!
//! The embeddings (`deberta.embeddings.*`: word, optionally absolute position and
//! token type, `embed_proj` when `embedding_size != hidden_size`, LayerNorm, then
//! zeroed at pads) feed post-LayerNorm layers whose self-attention adds to the
//! content scores QK^T the disentangled terms content->position (c2p) and
//! position->content (p2c), read from shared relative-position embeddings
//! (`deberta.encoder.rel_embeddings`, LayerNorm'd by `deberta.encoder.LayerNorm`
//! when `norm_rel_ebd = "layer_norm"`) at log-bucketed relative distances; see
//! [`super::deberta_attention`].
//!
//! The MLM head is kept under the names of HF's default (`legacy: true`) layout,
//! `cls.predictions.{transform.dense, transform.LayerNorm, bias}`, with the decoder
//! tied to the word embeddings; the `lm_predictions.lm_head.*` layout of DeBERTa-v3
//! checkpoints (`legacy: false`) is the same computation and is mapped onto these
//! names when loading (the aliases of [`SPEC`]'s name map). With `conv_kernel_size > 0`
//! (deberta-v2-xlarge and -xxlarge) the first layer's output also goes through
//! HF's `ConvLayer` (`deberta.encoder.conv`, [`ConvLayer`]). Keys HF reads that
//! this implementation does not are refused by [`DebertaV2Config::validate`],
//! never ignored.
use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::deberta_attention::{distance_buckets, pair_mask, AttentionSpec, DisentangledSelfAttention, RelativeInputs};
use super::layers::{self, dropout, Activation, Embedding, LayerNorm, Linear};
use super::linear_f32;
use super::policy::Attention;
use super::qkv::QkvProjection;
use super::shape::{encoder_layer_parameters, ModelShape, RelativeAttention};
use super::spec::{ArchSpec, Encoder, LayerInputs, NameMap, Objective};

/// `pos_att_type`: a list (`["p2c", "c2p"]`) or the older `"p2c|c2p"` string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PosAttType {
    List(Vec<String>),
    Joined(String),
}

impl PosAttType {
    /// The entries, as HF reads them (the string form lower-cased and split at `|`).
    fn entries(&self) -> Vec<String> {
        match self {
            Self::List(v) => v.clone(),
            Self::Joined(s) => s.to_lowercase().split('|').map(|x| x.trim().to_string()).collect(),
        }
    }
}

/// `DebertaV2Config`: the keys of `config.json` this model reads, with HF's defaults
/// (those of the config class, or of the `getattr` defaults in the modeling code
/// for keys the class does not declare: `share_att_key`, `position_buckets`,
/// `norm_rel_ebd`, `embedding_size`, `conv_kernel_size`, `conv_act`, `conv_groups`,
/// `attention_head_size`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DebertaV2Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub relative_attention: bool,
    pub max_relative_positions: i64,
    pub pad_token_id: Option<i64>,
    pub position_biased_input: bool,
    pub pos_att_type: Option<PosAttType>,
    pub legacy: bool,
    pub share_att_key: bool,
    pub position_buckets: i64,
    pub norm_rel_ebd: String,
    pub embedding_size: Option<i64>,
    pub conv_kernel_size: i64,
    pub conv_act: String,
    pub conv_groups: i64,
    pub attention_head_size: Option<i64>,
}

impl Default for DebertaV2Config {
    fn default() -> Self {
        Self {
            vocab_size: 128100,
            hidden_size: 1536,
            num_hidden_layers: 24,
            num_attention_heads: 24,
            intermediate_size: 6144,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-7,
            relative_attention: false,
            max_relative_positions: -1,
            pad_token_id: Some(0),
            position_biased_input: true,
            pos_att_type: None,
            legacy: true,
            share_att_key: false,
            position_buckets: -1,
            norm_rel_ebd: "none".into(),
            embedding_size: None,
            conv_kernel_size: 0,
            conv_act: "tanh".into(),
            conv_groups: 1,
            attention_head_size: None,
        }
    }
}

impl DebertaV2Config {
    /// `embedding_size`, defaulting to `hidden_size`.
    pub fn embedding_dim(&self) -> i64 {
        self.embedding_size.unwrap_or(self.hidden_size)
    }

    /// `max_relative_positions`, or `max_position_embeddings` when below 1 (as HF).
    fn max_relative(&self) -> i64 {
        if self.max_relative_positions < 1 {
            self.max_position_embeddings
        } else {
            self.max_relative_positions
        }
    }

    /// The convolution's activation when there is one (`conv_kernel_size > 0`),
    /// its kernel size and groups checked.
    pub(super) fn conv_activation(&self) -> Result<Option<Activation>> {
        if self.conv_kernel_size <= 0 {
            return Ok(None);
        }
        let k = self.conv_kernel_size;
        if k % 2 == 0 {
            // HF pads (k - 1) / 2 on each side, so an even kernel gives one
            // position fewer than the block and its ConvLayer fails.
            bail!("conv_kernel_size = {k} in config.json is not supported: it must be odd (transformers cannot run an even one either)");
        }
        if self.conv_groups <= 0 || self.hidden_size % self.conv_groups != 0 {
            bail!(
                "conv_groups = {} in config.json is not supported: it must divide hidden_size {}",
                self.conv_groups,
                self.hidden_size
            );
        }
        Activation::parse(&self.conv_act).map(Some).map_err(|e| anyhow::anyhow!("conv_act: {e}"))
    }

    pub(super) fn norm_rel_parts(&self) -> Vec<String> {
        self.norm_rel_ebd.to_lowercase().split('|').map(|x| x.trim().to_string()).collect()
    }

    /// Refuses what this implementation does not compute as HF does, naming the key.
    pub(super) fn validate(&self) -> Result<(Activation, AttentionSpec)> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} in config.json is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        let head_dim = self.hidden_size / self.num_attention_heads;
        if let Some(size) = self.attention_head_size.filter(|&s| s != head_dim) {
            bail!("attention_head_size = {size} in config.json is not supported: only hidden_size / num_attention_heads = {head_dim}");
        }
        let entries = self.pos_att_type.as_ref().map(PosAttType::entries).unwrap_or_default();
        if let Some(bad) = entries.iter().find(|e| !matches!(e.as_str(), "c2p" | "p2c")) {
            bail!("pos_att_type entry {bad:?} in config.json is not supported (supported: \"c2p\", \"p2c\")");
        }
        if let Some(bad) = self.norm_rel_parts().iter().find(|p| !matches!(p.as_str(), "none" | "layer_norm")) {
            bail!("norm_rel_ebd = {bad:?} in config.json is not supported (supported: \"none\", \"layer_norm\")");
        }
        self.conv_activation()?;
        if self.embedding_dim() <= 0 {
            bail!("embedding_size = {} in config.json must be positive", self.embedding_dim());
        }
        if !self.legacy && self.embedding_dim() != self.hidden_size {
            bail!(
                "legacy = false with embedding_size {} != hidden_size {} in config.json is not supported (transformers cannot run it either)",
                self.embedding_dim(),
                self.hidden_size
            );
        }
        if self.type_vocab_size < 0 {
            bail!("type_vocab_size = {} in config.json must be >= 0", self.type_vocab_size);
        }
        if self.relative_attention && self.position_buckets <= 0 && self.max_relative() < 1 {
            bail!(
                "relative_attention = true needs max_relative_positions or max_position_embeddings >= 1 in config.json"
            );
        }
        let span = if self.position_buckets > 0 { self.position_buckets } else { self.max_relative() };
        let spec = AttentionSpec {
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            relative_attention: self.relative_attention,
            share_att_key: self.share_att_key,
            c2p: entries.iter().any(|e| e == "c2p"),
            p2c: entries.iter().any(|e| e == "p2c"),
            span,
            position_buckets: self.position_buckets,
            max_relative_positions: self.max_relative(),
            std: self.initializer_range,
            attention_dropout: self.attention_probs_dropout_prob,
            pos_dropout: self.hidden_dropout_prob,
        };
        Ok((Activation::parse(&self.hidden_act)?, spec))
    }
}

/// `deberta.embeddings`: word (+ absolute position) (+ token type 0), `embed_proj`,
/// LayerNorm, zeroed at pads, dropout.
#[derive(Debug)]
struct DebertaEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Option<Embedding>,
    token_type_embeddings: Option<Embedding>,
    /// `embed_proj.weight` [hidden, embedding_size], no bias.
    embed_proj: Option<Tensor>,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl DebertaEmbeddings {
    fn new(p: &nn::Path, c: &DebertaV2Config) -> Self {
        let (e, std) = (c.embedding_dim(), c.initializer_range);
        Self {
            word_embeddings: Embedding::new(&(p / "word_embeddings"), c.vocab_size, e, std, c.pad_token_id),
            position_embeddings: c
                .position_biased_input
                .then(|| Embedding::new(&(p / "position_embeddings"), c.max_position_embeddings, e, std, None)),
            token_type_embeddings: (c.type_vocab_size > 0)
                .then(|| Embedding::new(&(p / "token_type_embeddings"), c.type_vocab_size, e, std, None)),
            embed_proj: (e != c.hidden_size)
                .then(|| layers::normal(&(p / "embed_proj"), "weight", &[c.hidden_size, e], std)),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), c.hidden_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `input_ids`, `attention_mask` [b, s] -> [b, s, h]; `attention_mask`:
    /// `Some` only when it has a 0 (without one, zeroing the pads is skipped).
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Tensor {
        let s = input_ids.size()[1];
        let mut x = self.word_embeddings.forward(input_ids);
        if let Some(pos) = &self.position_embeddings {
            x = x + pos.forward(&Tensor::arange(s, (Kind::Int64, input_ids.device())));
        }
        if let Some(tt) = &self.token_type_embeddings {
            x = x + tt.weight.get(0);
        }
        if let Some(w) = &self.embed_proj {
            x = x.linear::<Tensor>(w, None);
        }
        let mut x = self.layer_norm.forward(&x);
        if let Some(m) = attention_mask {
            x = &x * m.unsqueeze(-1).to_kind(x.kind());
        }
        dropout(&x, self.dropout, train)
    }
}

/// `deberta.encoder.layer.N`: disentangled attention + `attention.output`, then
/// `intermediate` + `output` (the FFN), post-LayerNorm like BERT.
#[derive(Debug)]
struct DebertaLayer {
    attention: DisentangledSelfAttention,
    attention_output: Linear,
    attention_layer_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
    act: Activation,
    dropout: f64,
}

impl DebertaLayer {
    fn new(p: &nn::Path, c: &DebertaV2Config, act: Activation, spec: AttentionSpec) -> Self {
        let (h, std, eps) = (c.hidden_size, c.initializer_range, c.layer_norm_eps);
        let a = p / "attention";
        Self {
            attention: DisentangledSelfAttention::new(&(&a / "self"), spec),
            attention_output: Linear::new(&(&a / "output" / "dense"), h, h, std),
            attention_layer_norm: LayerNorm::new(&(&a / "output" / "LayerNorm"), h, eps),
            intermediate: Linear::new(&(p / "intermediate" / "dense"), h, c.intermediate_size, std),
            output: Linear::new(&(p / "output" / "dense"), c.intermediate_size, h, std),
            output_layer_norm: LayerNorm::new(&(p / "output" / "LayerNorm"), h, eps),
            act,
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `x` [b, s, h], `pad` [b, 1, s, s] bool (the pairs to mask; `None`: no
    /// padding), `rel` the relative-position inputs -> [b, s, h]
    fn forward(&self, x: &Tensor, pad: Option<&Tensor>, rel: Option<&RelativeInputs>, train: bool) -> Tensor {
        let ctx = self.attention.forward(x, pad, rel, train);
        let y = dropout(&self.attention_output.forward(&ctx), self.dropout, train);
        let x = self.attention_layer_norm.forward(&(y + x));
        let y = dropout(&self.output.forward(&self.act.forward(&self.intermediate.forward(&x))), self.dropout, train);
        self.output_layer_norm.forward(&(y + x))
    }
}

/// `deberta.encoder.conv`, HF's `ConvLayer` (deberta-v2-xlarge, -xxlarge): a 1-d
/// convolution over the positions of the embeddings' output, added to the first
/// layer's output: `LayerNorm(layer_0 + act(dropout(conv(x) zeroed at pads)))`,
/// zeroed at pads.
#[derive(Debug)]
struct ConvLayer {
    /// `conv.weight` [h, h / groups, k], `conv.bias` [h].
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    layer_norm: LayerNorm,
    act: Activation,
    dropout: f64,
}

impl ConvLayer {
    fn new(p: &nn::Path, c: &DebertaV2Config, act: Activation) -> Self {
        let (h, k, g) = (c.hidden_size, c.conv_kernel_size, c.conv_groups);
        let conv = p / "conv";
        Self {
            weight: layers::normal(&conv, "weight", &[h, h / g, k], c.initializer_range),
            bias: conv.zeros("bias", &[h]),
            groups: g,
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), h, c.layer_norm_eps),
            act,
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `embedded` (the embeddings' output) and `residual` (the first layer's)
    /// [b, s, h]; `pads` [b, s, 1] bool, true at pads (`None`: no padding) -> [b, s, h]
    fn forward(&self, embedded: &Tensor, residual: &Tensor, pads: Option<&Tensor>, train: bool) -> Tensor {
        let k = self.weight.size()[2];
        let out = embedded.transpose(1, 2).conv1d(&self.weight, Some(&self.bias), [1], [(k - 1) / 2], [1], self.groups);
        let zero_pads = |t: Tensor| match pads {
            Some(pads) => t.masked_fill(pads, 0.0),
            None => t,
        };
        let out = zero_pads(out.transpose(1, 2).contiguous());
        let out = self.act.forward(&dropout(&out, self.dropout, train));
        zero_pads(self.layer_norm.forward(&(residual + out)))
    }
}

/// `cls.predictions`: transform (dense to embedding_size, act, LayerNorm), then the
/// tied decoder + bias. (`lm_predictions.lm_head.*` in the non-legacy layout.)
#[derive(Debug)]
struct DebertaLmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
    act: Activation,
}

impl DebertaLmHead {
    fn new(p: &nn::Path, c: &DebertaV2Config, act: Activation) -> Self {
        let (e, t) = (c.embedding_dim(), p / "transform");
        Self {
            dense: Linear::new(&(&t / "dense"), c.hidden_size, e, c.initializer_range),
            layer_norm: LayerNorm::new(&(&t / "LayerNorm"), e, c.layer_norm_eps),
            bias: p.zeros("bias", &[c.vocab_size]),
            act,
        }
    }

    /// `x` [..., h], `decoder` = word embeddings [vocab, e] -> [..., vocab]
    fn forward(&self, x: &Tensor, decoder: &Tensor) -> Tensor {
        let x = self.layer_norm.forward(&self.act.forward(&self.dense.forward(x)));
        linear_f32::linear(&x, decoder, Some(&self.bias))
    }
}

/// `DebertaV2ForMaskedLM`: `deberta.embeddings`, `deberta.encoder.{layer.*,
/// rel_embeddings, LayerNorm, conv}`, `cls.predictions`.
#[derive(Debug)]
pub struct DebertaV2ForMaskedLM {
    pub config: DebertaV2Config,
    embeddings: DebertaEmbeddings,
    layers: Vec<DebertaLayer>,
    rel_embeddings: Option<Embedding>,
    rel_layer_norm: Option<LayerNorm>,
    /// `conv_kernel_size > 0`: the convolution after the first layer.
    conv: Option<ConvLayer>,
    head: DebertaLmHead,
    spec: AttentionSpec,
    /// [`distance_buckets`] per (block length, device): built once, not per forward.
    buckets: Mutex<HashMap<(i64, Device), Tensor>>,
}

impl DebertaV2ForMaskedLM {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: DebertaV2Config) -> Result<Self> {
        let (act, spec) = config.validate()?;
        let conv_act = config.conv_activation()?;
        let base = root / "deberta";
        let encoder = &base / "encoder";
        let layers = (0..config.num_hidden_layers)
            .map(|i| DebertaLayer::new(&(&encoder / "layer" / i), &config, act, spec))
            .collect();
        let h = config.hidden_size;
        // HF creates the LayerNorm whenever norm_rel_ebd asks for it, used or not.
        let rel_layer_norm = config
            .norm_rel_parts()
            .iter()
            .any(|p| p == "layer_norm")
            .then(|| LayerNorm::new(&(&encoder / "LayerNorm"), h, config.layer_norm_eps));
        Ok(Self {
            embeddings: DebertaEmbeddings::new(&(&base / "embeddings"), &config),
            layers,
            rel_embeddings: spec.relative_attention.then(|| {
                Embedding::new(&(&encoder / "rel_embeddings"), 2 * spec.span, h, config.initializer_range, None)
            }),
            rel_layer_norm,
            conv: conv_act.map(|a| ConvLayer::new(&(&encoder / "conv"), &config, a)),
            head: DebertaLmHead::new(&(root / "cls" / "predictions"), &config, act),
            spec,
            config,
            buckets: Mutex::default(),
        })
    }

    /// The cached [`distance_buckets`] of blocks of length `s` on `device`.
    fn distance_buckets(&self, s: i64, device: Device) -> Tensor {
        let mut cache = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry((s, device)).or_insert_with(|| distance_buckets(s, &self.spec).to_device(device)).shallow_clone()
    }
}

impl Encoder for DebertaV2ForMaskedLM {
    /// `input_ids`, `attention_mask` [b, s] -> the embeddings [b, s, h] and what each layer takes
    fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs) {
        // Training chunks have no padding and say so (`None`): no flag is read
        // back (a device sync), and every layer is spared a masked_fill over
        // [b, heads, s, s] and its backward. A given mask is inspected once.
        let mask = attention_mask.filter(|&m| m.eq(0i64).any().int64_value(&[]) != 0);
        let x = self.embeddings.forward(input_ids, mask, train);
        let pad = mask.map(|m| pair_mask(m).logical_not());
        let s = input_ids.size()[1];
        // [2 span, h]; every layer shares it (and sums its gradient).
        let rel = self.rel_embeddings.as_ref().map(|e| match &self.rel_layer_norm {
            Some(ln) => ln.forward(&e.weight),
            None => e.weight.shallow_clone(),
        });
        let rel_pos = rel.as_ref().map(|r| self.distance_buckets(s, r.device()));
        (x, LayerInputs { mask: pad, rel_embeddings: rel, rel_pos, ..Default::default() })
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        let rel = match (&inputs.rel_embeddings, &inputs.rel_pos) {
            (Some(rel), Some(by_distance)) => {
                Some(RelativeInputs::from_parts(rel.shallow_clone(), by_distance.shallow_clone()))
            }
            _ => None,
        };
        let y = self.layers[i].forward(x, inputs.mask.as_ref(), rel.as_ref(), train);
        match &self.conv {
            // The first layer's input is the embeddings' output, what HF convolves.
            Some(conv) if i == 0 => {
                // Token i is a pad where query i may not see key i: [b, 1, s, s] -> [b, s, 1].
                let pads = inputs.mask.as_ref().map(|pad| pad.diagonal(0, -2, -1).squeeze_dim(1).unsqueeze(-1));
                conv.forward(x, &y, pads.as_ref(), train)
            }
            _ => y,
        }
    }

    /// `hidden` [..., h] -> logits [..., vocab]
    fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        self.head.forward(hidden, &self.embeddings.word_embeddings.weight)
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

    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection> {
        self.layers.iter_mut().map(|l| l.attention.qkv_mut()).collect()
    }
}

/// DeBERTa-v2/v3's entry in the registry (`ARCHITECTURES`, `mod.rs`). Saved configs say
/// `legacy: true`: our head names are those of the legacy layout
/// (`cls.predictions.*`), whatever layout the loaded checkpoint had.
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "deberta-v2",
    mlm_class: "DebertaV2ForMaskedLM",
    class_prefix: "DebertaV2",
    // Both MLM-head layouts: `lm_predictions.lm_head.*` (`legacy: false`)
    // loads onto the default layout's names.
    names: NameMap {
        prefix: "deberta",
        aliases: &[
            ("cls.predictions.decoder.bias", "cls.predictions.bias"),
            ("lm_predictions.lm_head.bias", "cls.predictions.bias"),
            ("lm_predictions.lm_head.dense.weight", "cls.predictions.transform.dense.weight"),
            ("lm_predictions.lm_head.dense.bias", "cls.predictions.transform.dense.bias"),
            ("lm_predictions.lm_head.LayerNorm.weight", "cls.predictions.transform.LayerNorm.weight"),
            ("lm_predictions.lm_head.LayerNorm.bias", "cls.predictions.transform.LayerNorm.bias"),
        ],
        ignored: &[
            "cls.predictions.decoder.weight",
            "deberta.embeddings.position_ids",
            // HF drops absolute positions silently when position_biased_input = false.
            "deberta.embeddings.position_embeddings.weight",
        ],
    },
    build,
    shape,
    saved_flags: &[("legacy", true)],
    objective: Objective::Mlm,
};

fn read(config: &serde_json::Value) -> Result<DebertaV2Config> {
    serde_json::from_value(config.clone()).context("reading DeBERTa-v2 config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(DebertaV2ForMaskedLM::new(root, read(config)?)?))
}

fn shape(config: &serde_json::Value) -> Result<ModelShape> {
    let d = read(config)?;
    let (_, spec) = d.validate()?;
    let u = |x: i64| x.max(0) as u64;
    let (v, h, f, e) = (u(d.vocab_size), u(d.hidden_size), u(d.intermediate_size), u(d.embedding_dim()));
    let relative = spec.relative_attention.then_some(RelativeAttention {
        c2p: spec.c2p,
        p2c: spec.p2c,
        span: u(spec.span),
        share_att_key: spec.share_att_key,
    });
    let mut embeddings = v * e + 2 * h;
    if d.position_biased_input {
        embeddings += u(d.max_position_embeddings) * e;
    }
    embeddings += u(d.type_vocab_size) * e;
    if e != h {
        embeddings += h * e;
    }
    let own_projections = relative.map_or(0, |r| if r.share_att_key { 0 } else { r.c2p as u64 + r.p2c as u64 });
    let layer = encoder_layer_parameters(h, f) + own_projections * (h * h + h);
    let mut encoder = relative.map_or(0, |r| 2 * r.span * h);
    if d.norm_rel_parts().iter().any(|p| p == "layer_norm") {
        encoder += 2 * h;
    }
    let conv = d.conv_activation()?.is_some();
    if conv {
        // weight [h, h / groups, k], bias, LayerNorm
        encoder += h * (h / u(d.conv_groups)) * u(d.conv_kernel_size) + h + 2 * h;
    }
    let head = h * e + e + 2 * e + v;
    Ok(ModelShape {
        model_type: SPEC.model_type,
        attention: Attention::Disentangled,
        vocab: v,
        hidden: h,
        layers: u(d.num_hidden_layers),
        heads: u(d.num_attention_heads),
        intermediate: f,
        embedding: e,
        hidden_dropout: d.hidden_dropout_prob,
        attention_dropout: d.attention_probs_dropout_prob,
        attention_output_dropout: true,
        relative,
        conv,
        parameters: embeddings + u(d.num_hidden_layers) * layer + encoder + head,
        word_embedding_parameters: v * e,
        modern: None,
    })
}

#[cfg(test)]
mod tests;
