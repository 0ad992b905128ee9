//! BERT with its masked-language-model head.
//!
//! Devlin, Chang, Lee, Toutanova: "BERT: Pre-training of Deep Bidirectional
//! Transformers for Language Understanding" (NAACL 2019, arXiv:1810.04805).
//! Matches `transformers.BertForMaskedLM` (post-LayerNorm encoder, absolute
//! position embeddings); parameter names are Hugging Face's, e.g.
//! `bert.encoder.layer.0.attention.self.query.weight`. The decoder of the head is
//! tied to `bert.embeddings.word_embeddings.weight`; only its bias,
//! `cls.predictions.bias`, is a parameter of its own.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Tensor};

use super::layers::{additive_mask, attention, dropout, Activation, Embedding, LayerNorm, Linear};
use super::linear_f32;
use super::policy::Attention;
use super::qkv::QkvProjection;
use super::shape::{encoder_layer_parameters, ModelShape};
use super::spec::{ArchSpec, Encoder, LayerInputs, NameMap, Objective};

/// `BertConfig`: the keys of `config.json` this model reads, with HF's defaults.
/// Other keys are kept by `MaskedLm::config_json` and written back untouched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct BertConfig {
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
    pub pad_token_id: Option<i64>,
    pub position_embedding_type: String,
    /// Refused when true: a masked LM is a bidirectional encoder.
    pub is_decoder: bool,
    pub add_cross_attention: bool,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: Some(0),
            position_embedding_type: "absolute".into(),
            is_decoder: false,
            add_cross_attention: false,
        }
    }
}

impl BertConfig {
    pub(super) fn validate(&self) -> Result<Activation> {
        if self.is_decoder || self.add_cross_attention {
            bail!(
                "is_decoder / add_cross_attention = true in config.json is not supported: a masked LM is a \
                 bidirectional encoder"
            );
        }
        if self.position_embedding_type != "absolute" {
            bail!(
                "position_embedding_type {:?} in config.json is not supported (only \"absolute\")",
                self.position_embedding_type
            );
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} in config.json is not a multiple of num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Activation::parse(&self.hidden_act)
    }
}

/// `bert.embeddings`: word + token type (always 0) + absolute position, LayerNorm, dropout.
#[derive(Debug)]
struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl BertEmbeddings {
    fn new(p: &nn::Path, c: &BertConfig) -> Self {
        let std = c.initializer_range;
        Self {
            word_embeddings: Embedding::new(&(p / "word_embeddings"), c.vocab_size, c.hidden_size, std, c.pad_token_id),
            position_embeddings: Embedding::new(
                &(p / "position_embeddings"),
                c.max_position_embeddings,
                c.hidden_size,
                std,
                None,
            ),
            token_type_embeddings: Embedding::new(
                &(p / "token_type_embeddings"),
                c.type_vocab_size,
                c.hidden_size,
                std,
                None,
            ),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), c.hidden_size, c.layer_norm_eps),
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `input_ids` [b, s] -> [b, s, h]
    fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let s = input_ids.size()[1];
        let positions = Tensor::arange(s, (tch::Kind::Int64, input_ids.device()));
        // Same order of additions as HF: (word + token_type) + position.
        let x = self.word_embeddings.forward(input_ids) + self.token_type_embeddings.weight.get(0);
        let x = x + self.position_embeddings.forward(&positions);
        dropout(&self.layer_norm.forward(&x), self.dropout, train)
    }
}

/// `attention.self` + `attention.output` of one layer.
#[derive(Debug)]
struct BertAttention {
    qkv: QkvProjection,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
    heads: i64,
    attention_dropout: f64,
    hidden_dropout: f64,
}

impl BertAttention {
    fn new(p: &nn::Path, c: &BertConfig) -> Self {
        let (h, std) = (c.hidden_size, c.initializer_range);
        let (s, o) = (p / "self", p / "output");
        Self {
            qkv: QkvProjection::new(
                Linear::new(&(&s / "query"), h, h, std),
                Linear::new(&(&s / "key"), h, h, std),
                Linear::new(&(&s / "value"), h, h, std),
            ),
            output_dense: Linear::new(&(&o / "dense"), h, h, std),
            output_layer_norm: LayerNorm::new(&(&o / "LayerNorm"), h, c.layer_norm_eps),
            heads: c.num_attention_heads,
            attention_dropout: c.attention_probs_dropout_prob,
            hidden_dropout: c.hidden_dropout_prob,
        }
    }

    /// `x` [b, s, h], `bias` [b, 1, 1, s] -> [b, s, h]
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>, train: bool) -> Tensor {
        let p = if train { self.attention_dropout } else { 0.0 };
        let [q, k, v] = self.qkv.forward(x);
        let ctx = attention(&q, &k, &v, bias, self.heads, p);
        let out = dropout(&self.output_dense.forward(&ctx), self.hidden_dropout, train);
        self.output_layer_norm.forward(&(out + x))
    }
}

/// `bert.encoder.layer.N`: attention, then `intermediate` + `output` (the FFN).
/// RoBERTa's layers are the same (`roberta.encoder.layer.N`).
#[derive(Debug)]
pub(super) struct BertLayer {
    attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
    act: Activation,
    dropout: f64,
}

impl BertLayer {
    pub(super) fn qkv_mut(&mut self) -> &mut QkvProjection {
        &mut self.attention.qkv
    }

    pub(super) fn new(p: &nn::Path, c: &BertConfig, act: Activation) -> Self {
        let std = c.initializer_range;
        Self {
            attention: BertAttention::new(&(p / "attention"), c),
            intermediate: Linear::new(&(p / "intermediate" / "dense"), c.hidden_size, c.intermediate_size, std),
            output: Linear::new(&(p / "output" / "dense"), c.intermediate_size, c.hidden_size, std),
            output_layer_norm: LayerNorm::new(&(p / "output" / "LayerNorm"), c.hidden_size, c.layer_norm_eps),
            act,
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `x` [b, s, h], `bias` [b, 1, 1, s] (from `additive_mask`; `None`: no padding) -> [b, s, h]
    pub(super) fn forward(&self, x: &Tensor, bias: Option<&Tensor>, train: bool) -> Tensor {
        let x = self.attention.forward(x, bias, train);
        let y = dropout(&self.output.forward(&self.act.forward(&self.intermediate.forward(&x))), self.dropout, train);
        self.output_layer_norm.forward(&(y + x))
    }
}

/// `cls.predictions`: transform (dense, act, LayerNorm), then the tied decoder + bias.
#[derive(Debug)]
struct BertLmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
    act: Activation,
}

impl BertLmHead {
    fn new(p: &nn::Path, c: &BertConfig, act: Activation) -> Self {
        let t = p / "transform";
        Self {
            dense: Linear::new(&(&t / "dense"), c.hidden_size, c.hidden_size, c.initializer_range),
            layer_norm: LayerNorm::new(&(&t / "LayerNorm"), c.hidden_size, c.layer_norm_eps),
            bias: p.zeros("bias", &[c.vocab_size]),
            act,
        }
    }

    /// `x` [..., h], `decoder` = word embeddings [vocab, h] -> [..., vocab]
    fn forward(&self, x: &Tensor, decoder: &Tensor) -> Tensor {
        let x = self.layer_norm.forward(&self.act.forward(&self.dense.forward(x)));
        linear_f32::linear(&x, decoder, Some(&self.bias))
    }
}

/// `BertForMaskedLM`: `bert.embeddings`, `bert.encoder.layer.*`, `cls.predictions`.
#[derive(Debug)]
pub struct BertForMaskedLM {
    pub config: BertConfig,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    head: BertLmHead,
}

impl BertForMaskedLM {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: BertConfig) -> Result<Self> {
        let act = config.validate()?;
        let bert = root / "bert";
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(&(&bert / "encoder" / "layer" / i), &config, act))
            .collect();
        Ok(Self {
            embeddings: BertEmbeddings::new(&(&bert / "embeddings"), &config),
            layers,
            head: BertLmHead::new(&(root / "cls" / "predictions"), &config, act),
            config,
        })
    }
}

impl Encoder for BertForMaskedLM {
    /// `input_ids`, `attention_mask` [b, s] -> the embeddings [b, s, h] and what each layer takes
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
        self.layers.iter_mut().map(|l| &mut l.attention.qkv).collect()
    }
}

/// BERT's entry in the registry (`ARCHITECTURES`, `mod.rs`).
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "bert",
    mlm_class: "BertForMaskedLM",
    class_prefix: "Bert",
    names: NameMap {
        prefix: "bert",
        aliases: &[("cls.predictions.decoder.bias", "cls.predictions.bias")],
        ignored: &["cls.predictions.decoder.weight", "bert.embeddings.position_ids", "bert.embeddings.token_type_ids"],
    },
    build,
    shape,
    saved_flags: &[],
    objective: Objective::Mlm,
};

fn read(config: &serde_json::Value) -> Result<BertConfig> {
    serde_json::from_value(config.clone()).context("reading BERT config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(BertForMaskedLM::new(root, read(config)?)?))
}

fn shape(config: &serde_json::Value) -> Result<ModelShape> {
    let c = read(config)?;
    c.validate()?;
    Ok(c.shape(SPEC.model_type))
}

impl BertConfig {
    /// The sizes of the MLM model of this (validated) config, RoBERTa's too.
    pub(super) fn shape(&self, model_type: &'static str) -> ModelShape {
        let u = |x: i64| x.max(0) as u64;
        let (v, h, f) = (u(self.vocab_size), u(self.hidden_size), u(self.intermediate_size));
        let embeddings = (v + u(self.max_position_embeddings) + u(self.type_vocab_size)) * h + 2 * h;
        let head = h * h + h + 2 * h + v;
        ModelShape {
            model_type,
            attention: Attention::Plain,
            vocab: v,
            hidden: h,
            layers: u(self.num_hidden_layers),
            heads: u(self.num_attention_heads),
            intermediate: f,
            embedding: h,
            hidden_dropout: self.hidden_dropout_prob,
            attention_dropout: self.attention_probs_dropout_prob,
            attention_output_dropout: true,
            relative: None,
            conv: false,
            parameters: embeddings + u(self.num_hidden_layers) * encoder_layer_parameters(h, f) + head,
            word_embedding_parameters: v * h,
            modern: None,
        }
    }
}
