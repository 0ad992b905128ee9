//! RoBERTa (and DistilRoBERTa, a RoBERTa with fewer layers) with its
//! masked-language-model head.
//!
//! Liu, Ott, Goyal, Du, Joshi, Chen, Levy, Lewis, Zettlemoyer, Stoyanov: "RoBERTa: A
//! Robustly Optimized BERT Pretraining Approach" (arXiv:1907.11692).
//! Matches `transformers.RobertaForMaskedLM` (and `XLMRobertaForMaskedLM`, the same
//! network under another name): BERT's encoder layers, but position ids that
//! start after `padding_idx` (fairseq's `make_positions`: a pad keeps position
//! `padding_idx`, the k-th real token gets `padding_idx + k`), and the head
//! `lm_head.{dense, layer_norm, bias}` with exact GELU whatever `hidden_act` says.
//! The decoder `lm_head.decoder.weight` is tied to
//! `roberta.embeddings.word_embeddings.weight` and `lm_head.decoder.bias` to
//! `lm_head.bias`, so neither is a parameter of its own.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::bert::{BertConfig, BertLayer};
use super::layers::{additive_mask, dropout, Activation, Embedding, LayerNorm, Linear};
use super::linear_f32;
use super::qkv::QkvProjection;
use super::shape::ModelShape;
use super::spec::{ArchSpec, Encoder, LayerInputs, NameMap, Objective};

/// `RobertaConfig`: BERT's keys with RoBERTa's defaults (`vocab_size = 50265`,
/// `pad_token_id = 1`, which is also the `padding_idx` of the position
/// embeddings). It dereferences to the [`BertConfig`] its encoder layers read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RobertaConfig {
    #[serde(flatten)]
    pub bert: BertConfig,
}

impl Default for RobertaConfig {
    fn default() -> Self {
        Self { bert: BertConfig { vocab_size: 50265, pad_token_id: Some(1), ..BertConfig::default() } }
    }
}

impl<'de> Deserialize<'de> for RobertaConfig {
    /// BERT's keys, RoBERTa's defaults where `config.json` leaves them out.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let mut keys = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        let defaults = Self::default();
        keys.entry("vocab_size").or_insert(defaults.vocab_size.into());
        keys.entry("pad_token_id").or_insert(1.into());
        let bert = BertConfig::deserialize(serde_json::Value::Object(keys)).map_err(serde::de::Error::custom)?;
        Ok(Self { bert })
    }
}

impl std::ops::Deref for RobertaConfig {
    type Target = BertConfig;

    fn deref(&self) -> &BertConfig {
        &self.bert
    }
}

impl RobertaConfig {
    /// `pad_token_id`: the padding token and the position table's `padding_idx`.
    pub fn padding_idx(&self) -> i64 {
        self.bert.pad_token_id.unwrap_or(1)
    }

    /// The longest sequence the position table holds: positions run from
    /// `padding_idx + 1` to `max_position_embeddings - 1`.
    pub fn max_tokens(&self) -> i64 {
        self.max_position_embeddings - self.padding_idx() - 1
    }

    pub(super) fn validate(&self) -> Result<Activation> {
        if self.type_vocab_size < 1 {
            bail!(
                "type_vocab_size {} in config.json is not supported (RoBERTa needs at least 1)",
                self.type_vocab_size
            );
        }
        if !(0..self.vocab_size).contains(&self.padding_idx()) || self.max_tokens() < 1 {
            bail!(
                "pad_token_id {} in config.json must be a token id below vocab_size {} and leave room in max_position_embeddings {}",
                self.padding_idx(),
                self.vocab_size,
                self.max_position_embeddings
            );
        }
        self.bert.validate()
    }
}

/// `roberta.embeddings`: word + token type (always 0) + position (offset past the
/// padding index), LayerNorm, dropout.
#[derive(Debug)]
struct RobertaEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    padding_idx: i64,
    dropout: f64,
}

impl RobertaEmbeddings {
    fn new(p: &nn::Path, c: &RobertaConfig) -> Self {
        let (h, std, pad) = (c.hidden_size, c.initializer_range, Some(c.padding_idx()));
        Self {
            word_embeddings: Embedding::new(&(p / "word_embeddings"), c.vocab_size, h, std, pad),
            position_embeddings: Embedding::new(&(p / "position_embeddings"), c.max_position_embeddings, h, std, pad),
            token_type_embeddings: Embedding::new(&(p / "token_type_embeddings"), c.type_vocab_size, h, std, None),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), h, c.layer_norm_eps),
            padding_idx: c.padding_idx(),
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `input_ids` [b, s] -> [b, s, h]
    fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let positions = position_ids(input_ids, self.padding_idx);
        let x = self.word_embeddings.forward(input_ids) + self.token_type_embeddings.weight.get(0);
        let x = x + self.position_embeddings.forward(&positions);
        dropout(&self.layer_norm.forward(&x), self.dropout, train)
    }
}

/// HF's `create_position_ids_from_input_ids`: `cumsum(non-pad) * non-pad + padding_idx`.
/// `input_ids` [b, s] -> [b, s] i64.
pub fn position_ids(input_ids: &Tensor, padding_idx: i64) -> Tensor {
    let mask = input_ids.ne(padding_idx).to_kind(Kind::Int64);
    mask.cumsum(1, Kind::Int64) * &mask + padding_idx
}

/// `lm_head`: dense, exact GELU, `layer_norm`, then the tied decoder + `bias`.
#[derive(Debug)]
struct RobertaLmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
}

impl RobertaLmHead {
    fn new(p: &nn::Path, c: &RobertaConfig) -> Self {
        let h = c.hidden_size;
        Self {
            dense: Linear::new(&(p / "dense"), h, h, c.initializer_range),
            layer_norm: LayerNorm::new(&(p / "layer_norm"), h, c.layer_norm_eps),
            bias: p.zeros("bias", &[c.vocab_size]),
        }
    }

    /// `x` [..., h], `decoder` = word embeddings [vocab, h] -> [..., vocab]
    fn forward(&self, x: &Tensor, decoder: &Tensor) -> Tensor {
        let x = self.layer_norm.forward(&self.dense.forward(x).gelu("none"));
        linear_f32::linear(&x, decoder, Some(&self.bias))
    }
}

/// `RobertaForMaskedLM`: `roberta.embeddings`, `roberta.encoder.layer.*`, `lm_head`.
#[derive(Debug)]
pub struct RobertaForMaskedLM {
    pub config: RobertaConfig,
    embeddings: RobertaEmbeddings,
    layers: Vec<BertLayer>,
    head: RobertaLmHead,
}

impl RobertaForMaskedLM {
    /// Creates the parameters under `root` (the VarStore root), HF-initialised.
    pub fn new(root: &nn::Path, config: RobertaConfig) -> Result<Self> {
        let act = config.validate()?;
        let base = root / "roberta";
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(&(&base / "encoder" / "layer" / i), &config.bert, act))
            .collect();
        Ok(Self {
            embeddings: RobertaEmbeddings::new(&(&base / "embeddings"), &config),
            layers,
            head: RobertaLmHead::new(&(root / "lm_head"), &config),
            config,
        })
    }
}

impl Encoder for RobertaForMaskedLM {
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
        self.config.max_tokens()
    }

    fn hidden_size(&self) -> i64 {
        self.config.hidden_size
    }

    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection> {
        self.layers.iter_mut().map(|l| l.qkv_mut()).collect()
    }
}

/// RoBERTa's entry in the registry (`ARCHITECTURES`, `mod.rs`).
pub static SPEC: ArchSpec = ArchSpec {
    model_type: "roberta",
    mlm_class: "RobertaForMaskedLM",
    class_prefix: "Roberta",
    names: NAMES,
    build,
    shape: |c| shape(c, SPEC.model_type),
    saved_flags: &[],
    objective: Objective::Mlm,
};

/// XLM-RoBERTa's: RoBERTa's network and weight names under its own class.
pub static XLM_ROBERTA_SPEC: ArchSpec = ArchSpec {
    model_type: "xlm-roberta",
    mlm_class: "XLMRobertaForMaskedLM",
    class_prefix: "XLMRoberta",
    names: NAMES,
    build,
    shape: |c| shape(c, XLM_ROBERTA_SPEC.model_type),
    saved_flags: &[],
    objective: Objective::Mlm,
};

/// CamemBERT's (`CamembertForMaskedLM`): RoBERTa's network and weight names
/// (base-model prefix `roberta`) under its own class, with
/// `CamembertConfig`'s default `vocab_size` of 30522.
pub static CAMEMBERT_SPEC: ArchSpec = ArchSpec {
    model_type: "camembert",
    mlm_class: "CamembertForMaskedLM",
    class_prefix: "Camembert",
    names: NAMES,
    build: |root, c| build(root, &with_vocab_default(c, 30522)),
    shape: |c| shape(&with_vocab_default(c, 30522), CAMEMBERT_SPEC.model_type),
    saved_flags: &[],
    objective: Objective::Mlm,
};

/// `config` with `vocab_size` set to `vocab` where it leaves the key out:
/// a family whose config class defaults differ from `RobertaConfig`'s.
fn with_vocab_default(config: &serde_json::Value, vocab: i64) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(obj) = c.as_object_mut() {
        obj.entry("vocab_size").or_insert(vocab.into());
    }
    c
}

/// How Hugging Face names RoBERTa's (and XLM-RoBERTa's) weights.
const NAMES: NameMap = NameMap {
    prefix: "roberta",
    aliases: &[("lm_head.decoder.bias", "lm_head.bias")],
    ignored: &["lm_head.decoder.weight", "roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids"],
};

fn read(config: &serde_json::Value) -> Result<RobertaConfig> {
    serde_json::from_value(config.clone()).context("reading RoBERTa config.json")
}

fn build(root: &nn::Path, config: &serde_json::Value) -> Result<Box<dyn Encoder>> {
    Ok(Box::new(RobertaForMaskedLM::new(root, read(config)?)?))
}

/// BERT's sizes: the position table keeps its `max_position_embeddings` rows.
fn shape(config: &serde_json::Value, model_type: &'static str) -> Result<ModelShape> {
    let c = read(config)?;
    c.validate()?;
    Ok(c.bert.shape(model_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_start_after_the_padding_index_and_pads_keep_it() {
        let ids = Tensor::from_slice(&[0i64, 7, 8, 2, 0, 9, 2, 1, 1]).view([3, 3]);
        let pos: Vec<i64> = Vec::try_from(position_ids(&ids, 1).view([-1])).unwrap();
        assert_eq!(pos, [2, 3, 4, 2, 3, 4, 2, 1, 1]);
    }

    #[test]
    fn camembert_defaults_to_its_own_vocabulary_size() {
        let small = serde_json::json!({"model_type": "camembert", "hidden_size": 8, "num_attention_heads": 2});
        assert_eq!((CAMEMBERT_SPEC.shape)(&small).unwrap().vocab, 30522);
        assert_eq!((SPEC.shape)(&small).unwrap().vocab, 50265);
        let given = serde_json::json!({"vocab_size": 32005, "hidden_size": 8, "num_attention_heads": 2});
        assert_eq!((CAMEMBERT_SPEC.shape)(&given).unwrap().vocab, 32005);
    }
}
