//! What an architecture gives the rest of `model/`: its [`ArchSpec`] (one per
//! architecture, at the end of its model file, listed in the registry,
//! `ARCHITECTURES` in `mod.rs`), the [`Encoder`] its network implements, and
//! its [`NameMap`] (how Hugging Face names its weights, as torchtitan keeps a
//! state-dict adapter beside each model). [`Arch`] is the handle the rest holds.
use anyhow::Result;
use tch::{nn, Tensor};

use super::qkv::QkvProjection;
use super::shape::ModelShape;

/// One architecture, as every lookup sees it: `config.json` -> this spec
/// (`Arch::from_config`) -> the network, its weight names and its sizes. A
/// new architecture is one file ending with its spec, its lines in the
/// registry (`ARCHITECTURES` in `mod.rs`) and a parity test.
pub struct ArchSpec {
    /// `model_type` in `config.json`.
    pub model_type: &'static str,
    /// The `transformers` class whose weights and names we match, written to
    /// `architectures` when saving.
    pub mlm_class: &'static str,
    /// What the first `architectures` entry starts with, for a `config.json`
    /// without `model_type` (`"Bert"` for `BertModel`, `BertForMaskedLM`, ...).
    pub class_prefix: &'static str,
    /// How Hugging Face names the weights.
    pub names: NameMap,
    /// The network of a `config.json` (after the checks every architecture
    /// shares), its parameters created under the given path, HF-initialised.
    pub(crate) build: fn(&nn::Path, &serde_json::Value) -> Result<Box<dyn Encoder>>,
    /// The sizes of that network from the `config.json` alone, with the same
    /// refusals as `build` (`mlm estimate-memory`).
    pub shape: fn(&serde_json::Value) -> Result<ModelShape>,
    /// Keys a saved `config.json` gets, with their values: what our weight
    /// names imply (DeBERTa's `legacy: true`, its head layout).
    pub saved_flags: &'static [(&'static str, bool)],
    /// What the network is trained for: an encoder with a masked-LM head
    /// (`Mlm`) or a decoder predicting the next token (`Clm`); the default of
    /// `training.objective`.
    pub objective: Objective,
}

/// A training objective: masked language modelling (predict chosen tokens
/// from both sides) or causal language modelling (predict every next token
/// from the tokens before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Mlm,
    Clm,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Mlm => "mlm",
            Objective::Clm => "clm",
        }
    }
}

/// A decoder's key/value cache for generation: each layer's keys and values
/// of the positions seen so far (buffers [b, heads, capacity, head_dim] whose
/// first `len` positions hold them, grown by doubling), so that a new token
/// costs one position.
#[derive(Debug, Default)]
pub struct KvCache {
    /// One entry per layer, `None` until the first call.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache: the next token's position.
    pub len: i64,
}

/// A supported architecture: a handle on its spec in the registry, found by
/// `Arch::from_config` (in `mod.rs`, beside `ARCHITECTURES`).
#[derive(Clone, Copy)]
pub struct Arch(pub(super) &'static ArchSpec);

impl Arch {
    pub fn spec(self) -> &'static ArchSpec {
        self.0
    }

    /// The `transformers` class whose weights and names we match.
    pub fn mlm_class(self) -> &'static str {
        self.0.mlm_class
    }

    pub fn model_type(self) -> &'static str {
        self.0.model_type
    }

    /// What the architecture is trained for (the default of `training.objective`).
    pub fn objective(self) -> Objective {
        self.0.objective
    }
}

impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.0.model_type == other.0.model_type
    }
}

impl Eq for Arch {}

impl std::fmt::Debug for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Arch").field(&self.0.model_type).finish()
    }
}

/// The name rules of one architecture.
///
/// Our parameter names are those `save_pretrained` writes for the MLM class,
/// so saving is a plain dump; loading also takes base-model names without
/// `prefix`, `aliases` for parameters the file lacks, and skips `ignored` ones.
pub struct NameMap {
    /// The base model's prefix (`bert`, `roberta`, ...): base-model checkpoints
    /// name their weights without it.
    pub prefix: &'static str,
    /// Checkpoint names that stand for one of our parameters when the file lacks it.
    pub aliases: &'static [(&'static str, &'static str)],
    /// Names with nothing to load (tied decoder weights, non-persistent buffers);
    /// an entry `*suffix` covers every name ending with `suffix` (a buffer of
    /// each layer, GPT-2's `*.attn.bias`).
    pub ignored: &'static [&'static str],
}

/// What every layer of an encoder takes besides the hidden states.
#[derive(Debug, Default)]
pub struct LayerInputs {
    /// The attention mask in the form the layers use, `None` when nothing is
    /// padded: an additive bias for BERT-likes, the [b, 1, s, s] "may not see"
    /// mask for DeBERTa.
    pub mask: Option<Tensor>,
    /// DeBERTa: the normalised relative-position embeddings [2 span, h], which
    /// every layer shares and whose gradient sums over the layers.
    pub rel_embeddings: Option<Tensor>,
    /// DeBERTa: the relative-position bucket of each distance a block of
    /// length s can have, [2s - 1] i64 (`deberta_attention::distance_buckets`).
    pub rel_pos: Option<Tensor>,
    /// ModernBERT: the sliding-window layers' additive bias [1 or b, 1, s, s]
    /// (the band, pads folded in), `None` when the window covers the block
    /// and nothing is padded.
    pub window_mask: Option<Tensor>,
    /// ModernBERT: the rotary tables `[cos, sin]` [1, s, 1, head_dim] of the
    /// global layers (first) and of the sliding-window layers.
    pub rotary: Vec<[Tensor; 2]>,
}

impl LayerInputs {
    /// The same tensors (not copies).
    pub fn shallow_clone(&self) -> Self {
        let clone = |t: &Option<Tensor>| t.as_ref().map(Tensor::shallow_clone);
        Self {
            mask: clone(&self.mask),
            rel_embeddings: clone(&self.rel_embeddings),
            rel_pos: clone(&self.rel_pos),
            window_mask: clone(&self.window_mask),
            rotary: self.rotary.iter().map(|pair| pair.each_ref().map(Tensor::shallow_clone)).collect(),
        }
    }
}

/// What every architecture gives `MaskedLm`: one file per model implements it
/// (`impl Encoder for BertForMaskedLM` in `bert.rs`, ...).
///
/// The encoder is given in stages, embeddings then one call per layer, so that
/// activation checkpointing (`src/train/recompute.rs`) can keep only each
/// layer's input and run a layer again during backward.
pub(crate) trait Encoder: std::fmt::Debug + Send {
    /// `input_ids` [b, s], `attention_mask` [b, s] (`None`: no padding, known
    /// on the host, so attention runs without a mask) -> the embeddings
    /// [b, s, h] and what every layer takes besides them.
    fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs);
    fn num_layers(&self) -> usize;
    /// Layer `i`: hidden states [b, s, h] -> [b, s, h].
    fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor;
    /// `hidden` [..., h] -> logits [..., vocab].
    fn mlm_head(&self, hidden: &Tensor) -> Tensor;
    fn vocab_size(&self) -> i64;
    /// The longest sequence the model takes.
    fn max_positions(&self) -> i64;
    fn hidden_size(&self) -> i64;
    /// Each layer's query, key and value projections (for `MaskedLm::fuse_qkv`).
    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection>;
    /// Decoders: `input_ids` [b, n], the tokens after the `cache.len`
    /// positions in `cache` -> the final hidden states [b, n, h] (what
    /// `mlm_head` takes), their keys and values appended to `cache` (no
    /// dropout, no autograd needed). `None` for encoders, which see both sides.
    fn decode(&self, _input_ids: &Tensor, _cache: &mut KvCache) -> Option<Tensor> {
        None
    }
}
