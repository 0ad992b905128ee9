//! The sizes of a model read from its `config.json` alone, without building it:
//! what `mlm estimate-memory` (`src/train/memory.rs`) needs before anything is
//! allocated. Each architecture's spec computes them (`ArchSpec::shape`, at the
//! end of its model file) from its own config struct (so with Hugging Face's
//! defaults) after its own checks, so a `config.json` that `mlm train` would
//! refuse is refused here too; `ModelShape::from_config` (`mod.rs`, the registry) picks
//! the architecture.
use super::policy::Attention;

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
    /// The architecture's `model_type`.
    pub model_type: &'static str,
    /// The attention the layers compute (the policy picks its path from it).
    pub attention: Attention,
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
    /// ModernBERT's layers, where they are the model's.
    pub modern: Option<ModernLayers>,
}

/// ModernBERT's layers, as they differ from BERT's for memory: pre-LayerNorm,
/// rotary embeddings applied to q and k in fp32, a GeGLU feed-forward (`Wi`
/// gives `2 intermediate` features: input and gate), sliding-window layers
/// with a band bias.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModernLayers {
    /// Parameters of one layer (biases where the config has them).
    pub layer_parameters: u64,
    /// Dropout inside the feed-forward (`mlp_dropout`).
    pub mlp_dropout: f64,
    /// Whether some layer attends through a window shorter than the block
    /// may be (its band bias, `[1, 1, s, s]`).
    pub windowed: bool,
}

impl ModelShape {
    /// Parameters of one encoder layer (all layers are alike).
    pub fn layer_parameters(&self) -> u64 {
        if let Some(modern) = self.modern {
            return modern.layer_parameters;
        }
        let own = self.relative.map_or(0, |r| if r.share_att_key { 0 } else { r.c2p as u64 + r.p2c as u64 });
        encoder_layer_parameters(self.hidden, self.intermediate) + own * (self.hidden * self.hidden + self.hidden)
    }

    /// Parameters of the MLM head besides the tied decoder weight: the
    /// transform and the decoder bias.
    pub fn head_parameters(&self) -> u64 {
        let (h, e) = (self.hidden, self.embedding);
        if self.modern.is_some() {
            // ModernBERT's head (dense without bias, norm without bias) and the
            // decoder bias, with its final norm: an upper bound by 2h where
            // those have biases.
            return h * e + 2 * e + self.vocab + h;
        }
        h * e + e + 2 * e + self.vocab
    }
}

/// One post-LayerNorm encoder layer: q, k, v and output projections, two
/// LayerNorms, the feed-forward pair.
pub(super) fn encoder_layer_parameters(h: u64, f: u64) -> u64 {
    4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
}
