//! The sizes of a model read from its `config.json` alone, without building it:
//! what `mlm estimate-memory` (`src/train/memory.rs`) needs before anything is
//! allocated. The keys are read by the architectures' own config structs (so
//! with Hugging Face's defaults) and refused by their own checks, so a
//! `config.json` that `mlm train` would refuse is refused here too.
use anyhow::{Context, Result};

use super::{check_config, Arch, BertConfig, DebertaV2Config, DistilBertConfig, RobertaConfig};

/// DeBERTa's relative-position attention, as the layers compute it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelativeAttention {
    /// content -> position (`c2p` in `pos_att_type`).
    pub c2p: bool,
    /// position -> content (`p2c`).
    pub p2c: bool,
    /// Relative distances run over `[-span, span)`: the relative embeddings
    /// have `2 span` rows.
    pub span: u64,
    /// The position projections are the content ones (`share_att_key`).
    pub share_att_key: bool,
}

/// The sizes that decide a model's memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    pub arch: Arch,
    pub vocab: u64,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub intermediate: u64,
    /// Width of the word embeddings, of the tied decoder and of the head's
    /// transform: DeBERTa's `embedding_size`, `hidden` elsewhere.
    pub embedding: u64,
    /// Dropout of the hidden states (embeddings, attention output, feed-forward).
    pub hidden_dropout: f64,
    /// Dropout of the attention probabilities.
    pub attention_dropout: f64,
    /// Whether the attention output projection is followed by dropout
    /// (DistilBERT has none there).
    pub attention_output_dropout: bool,
    /// DeBERTa with `relative_attention`.
    pub relative: Option<RelativeAttention>,
    /// DeBERTa-v2's convolution after the first layer (`conv_kernel_size > 0`).
    pub conv: bool,
    /// Every trainable scalar, the tied decoder counted once.
    pub parameters: u64,
    /// Of those, the word embeddings (also the tied decoder's weight).
    pub word_embedding_parameters: u64,
}

impl ModelShape {
    /// Reads and checks `config.json`'s contents.
    pub fn from_config(c: &serde_json::Value) -> Result<Self> {
        let arch = check_config(c)?;
        let u = |x: i64| x.max(0) as u64;
        let shape = match arch {
            Arch::Bert | Arch::Roberta | Arch::XlmRoberta => {
                let b: BertConfig = if arch == Arch::Bert {
                    let b: BertConfig = serde_json::from_value(c.clone()).context("reading BERT config.json")?;
                    b.validate()?;
                    b
                } else {
                    let r: RobertaConfig = serde_json::from_value(c.clone()).context("reading RoBERTa config.json")?;
                    r.validate()?;
                    r.bert
                };
                let (v, h, f) = (u(b.vocab_size), u(b.hidden_size), u(b.intermediate_size));
                let embeddings = (v + u(b.max_position_embeddings) + u(b.type_vocab_size)) * h + 2 * h;
                let head = h * h + h + 2 * h + v;
                Self {
                    arch,
                    vocab: v,
                    hidden: h,
                    layers: u(b.num_hidden_layers),
                    heads: u(b.num_attention_heads),
                    intermediate: f,
                    embedding: h,
                    hidden_dropout: b.hidden_dropout_prob,
                    attention_dropout: b.attention_probs_dropout_prob,
                    attention_output_dropout: true,
                    relative: None,
                    conv: false,
                    parameters: embeddings + u(b.num_hidden_layers) * bert_layer(h, f) + head,
                    word_embedding_parameters: v * h,
                }
            }
            Arch::DistilBert => {
                let d: DistilBertConfig =
                    serde_json::from_value(c.clone()).context("reading DistilBERT config.json")?;
                d.validate()?;
                let (v, h, f) = (u(d.vocab_size), u(d.dim), u(d.hidden_dim));
                let embeddings = (v + u(d.max_position_embeddings)) * h + 2 * h;
                let head = h * h + h + 2 * h + v;
                Self {
                    arch,
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
                    parameters: embeddings + u(d.n_layers) * bert_layer(h, f) + head,
                    word_embedding_parameters: v * h,
                }
            }
            Arch::DebertaV2 => {
                let d: DebertaV2Config = serde_json::from_value(c.clone()).context("reading DeBERTa-v2 config.json")?;
                let (_, spec) = d.validate()?;
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
                let own_projections =
                    relative.map_or(0, |r| if r.share_att_key { 0 } else { r.c2p as u64 + r.p2c as u64 });
                let layer = bert_layer(h, f) + own_projections * (h * h + h);
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
                Self {
                    arch,
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
                }
            }
        };
        Ok(shape)
    }

    /// Parameters of one encoder layer (all layers are alike).
    pub fn layer_parameters(&self) -> u64 {
        let own = self.relative.map_or(0, |r| if r.share_att_key { 0 } else { r.c2p as u64 + r.p2c as u64 });
        bert_layer(self.hidden, self.intermediate) + own * (self.hidden * self.hidden + self.hidden)
    }

    /// Parameters of the MLM head besides the tied decoder weight: the
    /// transform and the decoder bias.
    pub fn head_parameters(&self) -> u64 {
        let (h, e) = (self.hidden, self.embedding);
        h * e + e + 2 * e + self.vocab
    }
}

/// One post-LayerNorm encoder layer: q, k, v and output projections, two
/// LayerNorms, the feed-forward pair.
fn bert_layer(h: u64, f: u64) -> u64 {
    4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MaskedLm;
    use tch::Device;

    /// The count from `config.json` alone equals the built model's, for every
    /// architecture and the DeBERTa options that add or drop parameters.
    #[test]
    fn parameters_match_the_built_model() {
        let base = serde_json::json!({
            "vocab_size": 97, "hidden_size": 24, "dim": 24, "num_hidden_layers": 2, "n_layers": 2,
            "num_attention_heads": 4, "n_heads": 4, "intermediate_size": 40, "hidden_dim": 40,
            "max_position_embeddings": 30,
        });
        let deberta = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"model_type": "deberta-v2", "relative_attention": true,
                "position_buckets": 8, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm",
                "share_att_key": true, "position_biased_input": false, "type_vocab_size": 0});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let cases = [
            serde_json::json!({"model_type": "bert"}),
            serde_json::json!({"model_type": "roberta", "type_vocab_size": 1}),
            serde_json::json!({"model_type": "xlm-roberta"}),
            serde_json::json!({"model_type": "distilbert"}),
            deberta(serde_json::json!({})),
            deberta(serde_json::json!({"share_att_key": false})),
            deberta(serde_json::json!({"share_att_key": false, "pos_att_type": ["c2p"], "norm_rel_ebd": "none"})),
            deberta(serde_json::json!({"relative_attention": false, "position_biased_input": true})),
            deberta(serde_json::json!({"embedding_size": 16, "type_vocab_size": 2})),
            deberta(serde_json::json!({"conv_kernel_size": 3, "conv_act": "gelu"})),
            deberta(serde_json::json!({"conv_kernel_size": 5, "conv_groups": 4})),
        ];
        for extra in cases {
            let mut c = base.clone();
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            let shape = ModelShape::from_config(&c).unwrap();
            let model = MaskedLm::from_config_json(c.clone(), Device::Cpu).unwrap();
            assert_eq!(shape.parameters, model.num_parameters() as u64, "{c}");
            let word =
                model.vs.variables().iter().find(|(n, _)| n.ends_with("word_embeddings.weight")).unwrap().1.numel();
            assert_eq!(shape.word_embedding_parameters, word as u64, "{c}");
        }
    }

    #[test]
    fn configs_the_model_refuses_are_refused() {
        let c = serde_json::json!({"model_type": "deberta-v2", "conv_kernel_size": 2});
        let err = ModelShape::from_config(&c).unwrap_err().to_string();
        assert!(err.contains("conv_kernel_size"), "{err}");
        let c = serde_json::json!({"model_type": "bert", "hidden_size": 10, "num_attention_heads": 4});
        assert!(ModelShape::from_config(&c).is_err());
    }
}
