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
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use super::bert::{BertConfig, BertLayer};
use super::layers::{additive_mask, Activation, Embedding, LayerNorm, Linear};
use super::weights::NameMap;

/// `RobertaConfig`: the keys of `config.json` this model reads, with HF's defaults.
/// Other keys are kept by `MaskedLm::config_json` and written back untouched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RobertaConfig {
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
    /// Also RoBERTa's `padding_idx` of the position embeddings.
    pub pad_token_id: i64,
    pub position_embedding_type: String,
    pub is_decoder: bool,
    pub add_cross_attention: bool,
}

impl Default for RobertaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50265,
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
            pad_token_id: 1,
            position_embedding_type: "absolute".into(),
            is_decoder: false,
            add_cross_attention: false,
        }
    }
}

impl RobertaConfig {
    /// The longest sequence the position table holds: positions run from
    /// `pad_token_id + 1` to `max_position_embeddings - 1`.
    pub fn max_tokens(&self) -> i64 {
        self.max_position_embeddings - self.pad_token_id - 1
    }

    /// The same keys as BERT's encoder reads them.
    fn as_bert(&self) -> BertConfig {
        BertConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act.clone(),
            hidden_dropout_prob: self.hidden_dropout_prob,
            attention_probs_dropout_prob: self.attention_probs_dropout_prob,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            initializer_range: self.initializer_range,
            layer_norm_eps: self.layer_norm_eps,
            pad_token_id: Some(self.pad_token_id),
            position_embedding_type: self.position_embedding_type.clone(),
            is_decoder: self.is_decoder,
            add_cross_attention: self.add_cross_attention,
        }
    }

    fn validate(&self) -> Result<Activation> {
        if self.is_decoder || self.add_cross_attention {
            bail!("is_decoder / add_cross_attention = true in config.json is not supported: a masked LM is a bidirectional encoder");
        }
        if self.type_vocab_size < 1 {
            bail!(
                "type_vocab_size {} in config.json is not supported (RoBERTa needs at least 1)",
                self.type_vocab_size
            );
        }
        if !(0..self.vocab_size).contains(&self.pad_token_id) || self.max_tokens() < 1 {
            bail!(
                "pad_token_id {} in config.json must be a token id below vocab_size {} and leave room in max_position_embeddings {}",
                self.pad_token_id,
                self.vocab_size,
                self.max_position_embeddings
            );
        }
        self.as_bert().validate()
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
        let (h, std, pad) = (c.hidden_size, c.initializer_range, Some(c.pad_token_id));
        Self {
            word_embeddings: Embedding::new(&(p / "word_embeddings"), c.vocab_size, h, std, pad),
            position_embeddings: Embedding::new(&(p / "position_embeddings"), c.max_position_embeddings, h, std, pad),
            token_type_embeddings: Embedding::new(&(p / "token_type_embeddings"), c.type_vocab_size, h, std, None),
            layer_norm: LayerNorm::new(&(p / "LayerNorm"), h, c.layer_norm_eps),
            padding_idx: c.pad_token_id,
            dropout: c.hidden_dropout_prob,
        }
    }

    /// `input_ids` [b, s] -> [b, s, h]
    fn forward(&self, input_ids: &Tensor, train: bool) -> Tensor {
        let positions = position_ids(input_ids, self.padding_idx);
        let x = self.word_embeddings.forward(input_ids) + self.token_type_embeddings.weight.get(0);
        let x = x + self.position_embeddings.forward(&positions);
        self.layer_norm.forward(&x).dropout(self.dropout, train)
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
        x.linear(decoder, Some(&self.bias))
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
        let bert_config = config.as_bert();
        let base = root / "roberta";
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::new(&(&base / "encoder" / "layer" / i), &bert_config, act))
            .collect();
        Ok(Self {
            embeddings: RobertaEmbeddings::new(&(&base / "embeddings"), &config),
            layers,
            head: RobertaLmHead::new(&(root / "lm_head"), &config),
            config,
        })
    }

    /// `input_ids`, `attention_mask` [b, s] -> last hidden state [b, s, h]
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        let mut x = self.embeddings.forward(input_ids, train);
        let bias = additive_mask(attention_mask, x.kind());
        for layer in &self.layers {
            x = layer.forward(&x, bias.as_ref(), train);
        }
        x
    }

    /// `hidden` [..., h] -> logits [..., vocab]
    pub fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        self.head.forward(hidden, &self.embeddings.word_embeddings.weight)
    }
}

/// How Hugging Face names RoBERTa's (and XLM-RoBERTa's) weights (see `weights::NameMap`).
pub(super) const HF_NAMES: NameMap = NameMap {
    prefix: "roberta",
    aliases: &[("lm_head.decoder.bias", "lm_head.bias")],
    ignored: &["lm_head.decoder.weight", "roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids"],
};

impl super::Encoder for RobertaForMaskedLM {
    fn forward_hidden(&self, input_ids: &Tensor, attention_mask: &Tensor, train: bool) -> Tensor {
        RobertaForMaskedLM::forward_hidden(self, input_ids, attention_mask, train)
    }

    fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        RobertaForMaskedLM::mlm_head(self, hidden)
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
}
