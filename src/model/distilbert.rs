//! DistilBERT with its masked-language-model head.
//!
//! Sanh, Debut, Chaumond, Wolf: "DistilBERT, a distilled version of BERT: smaller,
//! faster, cheaper and lighter" (arXiv:1910.01108).
//! Matches `transformers.DistilBertForMaskedLM`: no token type embeddings,
//! LayerNorm eps fixed at 1e-12, a `vocab_transform` / `vocab_layer_norm` /
//! `vocab_projector` head whose projector weight is tied to
//! `distilbert.embeddings.word_embeddings.weight` (its bias,
//! `vocab_projector.bias`, is a parameter of its own).
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::layers::{additive_mask, attention, dropout, Activation, Embedding, LayerNorm, Linear};
use super::linear_f32;
use super::policy::Attention;
use super::qkv::QkvProjection;
use super::shape::{encoder_layer_parameters, ModelShape};
use super::spec::{ArchSpec, Encoder, LayerInputs, NameMap, Objective};

/// DistilBERT hard-codes this epsilon in every LayerNorm.
const LAYER_NORM_EPS: f64 = 1e-12;

/// `DistilBertConfig`: the keys of `config.json` this model reads, with HF's defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DistilBertConfig {
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    pub sinusoidal_pos_embds: bool,
    pub n_layers: i64,
    pub n_heads: i64,
    pub dim: i64,
    pub hidden_dim: i64,
    pub dropout: f64,
    pub attention_dropout: f64,
    pub activation: String,
    pub initializer_range: f64,
    pub pad_token_id: Option<i64>,
}

impl Default for DistilBertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            max_position_embeddings: 512,
            sinusoidal_pos_embds: false,
            n_layers: 6,
            n_heads: 12,
            dim: 768,
            hidden_dim: 4 * 768,
            dropout: 0.1,
            attention_dropout: 0.1,
            activation: "gelu".into(),
            initializer_range: 0.02,
            pad_token_id: Some(0),
        }
    }
}

impl DistilBertConfig {
    pub(super) fn validate(&self) -> Result<Activation> {
        if self.n_heads <= 0 || self.dim % self.n_heads != 0 {
            bail!("dim {} in config.json is not a multiple of n_heads {}", self.dim, self.n_heads);
        }
        Activation::parse(&self.activation)
    }
}

/// `distilbert.embeddings`: word + position, LayerNorm, dropout.
#[derive(Debug)]
struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn new(p: &nn::Path, c: &DistilBertConfig) -> Self {
        let std = c.initializer_range;
        let mut position_embeddings =
            Embedding::new(&(p / "position_embeddings"), c.max_position_embeddings, c.dim, std, None);
        if c.sinusoidal_pos_embds {
            tch::no_grad(|| {
                let table = sinusoidal_table(c.max_position_embeddings, c.dim);
                position_embeddings.weight.copy_(&table);
            });
        }
        Self {
            word_embeddings: Embedding::new(&(p / "word_embeddings"), c.vocab_size, c.dim, std, c.pad_token_id),
            position_embeddings,
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), c.dim, LAYER_NORM_EPS),
            dropout: c.dropout,
        }
    }

    /// `input_ids` [b, s] -> [b, s, dim]
    fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let s = input_ids.size()[1];
        let positions = Tensor::arange(s, (tch::Kind::Int64, input_ids.device()));
        let x = self.word_embeddings.forward(input_ids) + self.position_embeddings.forward(&positions);
        dropout(&self.layer_norm.forward(&x), self.dropout, train)
    }
}

/// HF's `create_sinusoidal_embeddings`: sin on even columns, cos on odd ones.
fn sinusoidal_table(n_pos: i64, dim: i64) -> Tensor {
    let table: Vec<f32> = (0..n_pos)
        .flat_map(|pos| {
            (0..dim).map(move |j| {
                let angle = pos as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / dim as f64);
                (if j % 2 == 0 { angle.sin() } else { angle.cos() }) as f32
            })
        })
        .collect();
    Tensor::from_slice(&table).view([n_pos, dim])
}

/// `distilbert.transformer.layer.N`: attention (`q_lin`, `k_lin`, `v_lin`, `out_lin`),
/// `sa_layer_norm`, `ffn` (`lin1`, `lin2`), `output_layer_norm`.
#[derive(Debug)]
struct TransformerBlock {
    qkv: QkvProjection,
    out_lin: Linear,
    sa_layer_norm: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    output_layer_norm: LayerNorm,
    heads: i64,
    act: Activation,
    dropout: f64,
    attention_dropout: f64,
}

impl TransformerBlock {
    fn new(p: &nn::Path, c: &DistilBertConfig, act: Activation) -> Self {
        let (d, std) = (c.dim, c.initializer_range);
        let (a, f) = (p / "attention", p / "ffn");
        Self {
            qkv: QkvProjection::new(
                Linear::new(&(&a / "q_lin"), d, d, std),
                Linear::new(&(&a / "k_lin"), d, d, std),
                Linear::new(&(&a / "v_lin"), d, d, std),
            ),
            out_lin: Linear::new(&(&a / "out_lin"), d, d, std),
            sa_layer_norm: LayerNorm::new(&(p / "sa_layer_norm"), d, LAYER_NORM_EPS),
            lin1: Linear::new(&(&f / "lin1"), d, c.hidden_dim, std),
            lin2: Linear::new(&(&f / "lin2"), c.hidden_dim, d, std),
            output_layer_norm: LayerNorm::new(&(p / "output_layer_norm"), d, LAYER_NORM_EPS),
            heads: c.n_heads,
            act,
            dropout: c.dropout,
            attention_dropout: c.attention_dropout,
        }
    }

    /// `x` [b, s, dim], `bias` [b, 1, 1, s] -> [b, s, dim]
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, train: bool) -> Tensor {
        let p = if train { self.attention_dropout } else { 0.0 };
        let [q, k, v] = self.qkv.forward(x);
        let ctx = attention(&q, &k, &v, bias, self.heads, p);
        // HF's DistilBERT applies no dropout to the attention output projection.
        let x = self.sa_layer_norm.forward(&(self.out_lin.forward(&ctx) + x));
        let y = dropout(&self.lin2.forward(&self.act.forward(&self.lin1.forward(&x))), self.dropout, train);
        self.output_layer_norm.forward(&(y + x))
    }
}

/// `DistilBertForMaskedLM`: `distilbert.*`, then `vocab_transform`, activation,
/// `vocab_layer_norm`, `vocab_projector` (tied weight, own bias).
#[derive(Debug)]
pub struct DistilBertForMaskedLM {
    pub config: DistilBertConfig,
    embeddings: Embeddings,
    layers: Vec<TransformerBlock>,
    vocab_transform: Linear,
    vocab_layer_norm: LayerNorm,
    vocab_projector_bias: Tensor,
    act: Activation,
}

impl DistilBertForMaskedLM {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: DistilBertConfig) -> Result<Self> {
        let act = config.validate()?;
        let base = root / "distilbert";
        let layers = (0..config.n_layers)
            .map(|i| TransformerBlock::new(&(&base / "transformer" / "layer" / i), &config, act))
            .collect();
        Ok(Self {
            embeddings: Embeddings::new(&(&base / "embeddings"), &config),
            layers,
            vocab_transform: Linear::new(&(root / "vocab_transform"), config.dim, config.dim, config.initializer_range),
            vocab_layer_norm: LayerNorm::new(&(root / "vocab_layer_norm"), config.dim, LAYER_NORM_EPS),
            vocab_projector_bias: (root / "vocab_projector").zeros("bias", &[config.vocab_size]),
            act,
            config,
        })
    }
}

impl Encoder for DistilBertForMaskedLM {
    /// `input_ids`, `attention_mask` [b, s] -> last hidden state [b, s, dim]
    fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs) {
        let x = self.embeddings.forward(input_ids, train);
        let mask = attention_mask.and_then(|m| additive_mask(m, x.kind()));
        (x, LayerInputs { mask, ..Default::default() })
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        self.layers[i].forward(x, inputs.mask.as_ref(), train)
    }

    /// `hidden` [..., dim] -> logits [..., vocab]
    fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        let x = self.act.forward(&self.vocab_transform.forward(hidden));
        let x = self.vocab_layer_norm.forward(&x);
        linear_f32::linear(&x, &self.embeddings.word_embeddings.weight, Some(&self.vocab_projector_bias))
    }

    fn vocab_size(&self) -> i64 {
        self.config.vocab_size
    }

    fn max_positions(&self) -> i64 {
        self.config.max_position_embeddings
    }

    fn hidden_size(&self) -> i64 {
        self.config.dim
    }

    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection> {
        self.layers.iter_mut().map(|l| &mut l.qkv).collect()
    }
}

/// DistilBERT's entry in the registry (`ARCHITECTURES`, `mod.rs`).
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "distilbert",
    mlm_class: "DistilBertForMaskedLM",
    class_prefix: "DistilBert",
    names: NameMap {
        prefix: "distilbert",
        aliases: &[],
        ignored: &["vocab_projector.weight", "distilbert.embeddings.position_ids"],
    },
    build,
    shape,
    saved_flags: &[],
    objective: Objective::Mlm,
};

fn read(config: &serde_json::Value) -> Result<DistilBertConfig> {
    serde_json::from_value(config.clone()).context("reading DistilBERT config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(DistilBertForMaskedLM::new(root, read(config)?)?))
}

fn shape(config: &serde_json::Value) -> Result<ModelShape> {
    let d = read(config)?;
    d.validate()?;
    let u = |x: i64| x.max(0) as u64;
    let (v, h, f) = (u(d.vocab_size), u(d.dim), u(d.hidden_dim));
    let embeddings = (v + u(d.max_position_embeddings)) * h + 2 * h;
    let head = h * h + h + 2 * h + v;
    Ok(ModelShape {
        model_type: SPEC.model_type,
        attention: Attention::Plain,
        vocab: v,
        hidden: h,
        layers: u(d.n_layers),
        heads: u(d.n_heads),
        intermediate: f,
        embedding: h,
        hidden_dropout: d.dropout,
        attention_dropout: d.attention_dropout,
        attention_output_dropout: false,
        relative: None,
        conv: false,
        parameters: embeddings + u(d.n_layers) * encoder_layer_parameters(h, f) + head,
        word_embedding_parameters: v * h,
        modern: None,
    })
}
