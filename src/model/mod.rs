//! Models: BERT-family encoders (BERT, DistilBERT, RoBERTa, DeBERTa-v2/v3) with
//! their masked-language-model heads, read from and written to Hugging Face's
//! layout (`config.json` + `model.safetensors`). `docs/models.md` lists the
//! config keys each honours and refuses.
//!
//! [`MaskedLm`] is what the rest of mlm sees: one type over the architectures,
//! holding the parameters in a `tch` VarStore whose names are Hugging Face's.
//! The compute dtype is the VarStore's: [`MaskedLm::to_kind_copy`] makes the bf16
//! compute copy of fp32 master weights.
pub mod bert;
pub mod deberta;
mod deberta_attention;
pub mod distilbert;
mod layers;
mod linear_f32;
pub mod load;
mod qkv;
pub mod roberta;
pub mod shape;
mod torch_pickle;
pub mod weights;

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use bert::{BertConfig, BertForMaskedLM};
pub use deberta::{DebertaV2Config, DebertaV2ForMaskedLM};
pub use distilbert::{DistilBertConfig, DistilBertForMaskedLM};
pub use linear_f32::gemm_via_f32;
pub use qkv::FusedLeaves;
use qkv::QkvProjection;
pub use roberta::{RobertaConfig, RobertaForMaskedLM};

/// The supported architectures, by `model_type` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    DistilBert,
    Roberta,
    /// XLM-RoBERTa: the same network and names as RoBERTa, another class name.
    XlmRoberta,
    DebertaV2,
}

const SUPPORTED: &str = "bert, distilbert, roberta, xlm-roberta, deberta-v2";

impl Arch {
    /// From `model_type`, or when that is absent, the first `architectures` entry.
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        if let Some(model_type) = config.get("model_type").and_then(|v| v.as_str()) {
            return match model_type {
                "bert" => Ok(Self::Bert),
                "distilbert" => Ok(Self::DistilBert),
                "roberta" => Ok(Self::Roberta),
                "xlm-roberta" => Ok(Self::XlmRoberta),
                "deberta-v2" => Ok(Self::DebertaV2),
                other => bail!("model_type {other:?} in config.json is not supported (supported: {SUPPORTED})"),
            };
        }
        let class = config.pointer("/architectures/0").and_then(|v| v.as_str()).unwrap_or("");
        if class.starts_with("DistilBert") {
            Ok(Self::DistilBert)
        } else if class.starts_with("Bert") {
            Ok(Self::Bert)
        } else if class.starts_with("Roberta") {
            Ok(Self::Roberta)
        } else if class.starts_with("XLMRoberta") {
            Ok(Self::XlmRoberta)
        } else if class.starts_with("DebertaV2") {
            Ok(Self::DebertaV2)
        } else {
            bail!("config.json has no model_type and its architecture {class:?} is not supported (supported: {SUPPORTED})")
        }
    }

    /// The `transformers` class whose weights and names we match.
    pub fn mlm_class(self) -> &'static str {
        match self {
            Self::Bert => "BertForMaskedLM",
            Self::DistilBert => "DistilBertForMaskedLM",
            Self::Roberta => "RobertaForMaskedLM",
            Self::XlmRoberta => "XLMRobertaForMaskedLM",
            Self::DebertaV2 => "DebertaV2ForMaskedLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::DistilBert => "distilbert",
            Self::Roberta => "roberta",
            Self::XlmRoberta => "xlm-roberta",
            Self::DebertaV2 => "deberta-v2",
        }
    }
}

/// Sizes every architecture's `config.json` may give, with their allowed range:
/// a value outside would build a model that cannot exist (negative sizes) or
/// cannot be allocated (a million-wide hidden size).
const SIZES: [(&str, i64, i64); 16] = [
    ("vocab_size", 1, 1 << 24),
    ("hidden_size", 1, 1 << 16),
    ("dim", 1, 1 << 16),
    ("num_hidden_layers", 1, 1024),
    ("n_layers", 1, 1024),
    ("num_attention_heads", 1, 1024),
    ("n_heads", 1, 1024),
    ("intermediate_size", 1, 1 << 18),
    ("hidden_dim", 1, 1 << 18),
    ("max_position_embeddings", 1, 1 << 20),
    ("type_vocab_size", 0, 1 << 16),
    ("embedding_size", 1, 1 << 16),
    ("position_buckets", -1, 1 << 16),
    ("max_relative_positions", -1, 1 << 20),
    ("conv_kernel_size", 0, 1025),
    ("conv_groups", 1, 1 << 16),
];

/// Probabilities (dropouts), in [0, 1).
const DROPOUTS: [&str; 6] = [
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
    "pooler_dropout",
    "qa_dropout",
];

/// Refuses `config.json` values outside their meaning, naming the key.
fn check_ranges(c: &serde_json::Value) -> Result<()> {
    for (key, lo, hi) in SIZES {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => {}
            _ => bail!("{key} = {v} in config.json must be an integer from {lo} to {hi}"),
        }
    }
    for key in DROPOUTS {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => {}
            _ => bail!("{key} = {v} in config.json must be a probability in [0, 1)"),
        }
    }
    for (key, zero_ok) in [("layer_norm_eps", false), ("initializer_range", true)] {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_f64() {
            Some(x) if x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)) => {}
            _ => bail!(
                "{key} = {v} in config.json must be a finite {} number",
                if zero_ok { "non-negative" } else { "positive" }
            ),
        }
    }
    Ok(())
}

/// The architecture of a `config.json`, after the checks every architecture
/// shares (sizes and probabilities in range, a tied decoder).
fn check_config(c: &serde_json::Value) -> Result<Arch> {
    let arch = Arch::from_config(c)?;
    check_ranges(c)?;
    if c.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(false) {
        bail!("tie_word_embeddings = false in config.json is not supported: the MLM decoder is tied to the word embeddings");
    }
    Ok(arch)
}

/// Parameters of an encoder of `config.json`'s shape (embeddings, layers with
/// attention and feed-forward, the MLM head's transform), for a memory check
/// before anything is allocated.
pub fn estimate_parameters(c: &serde_json::Value) -> u64 {
    let get =
        |keys: &[&str], default: u64| keys.iter().find_map(|k| c.get(*k).and_then(|v| v.as_u64())).unwrap_or(default);
    let vocab = get(&["vocab_size"], 30522);
    let h = get(&["hidden_size", "dim"], 768);
    let layers = get(&["num_hidden_layers", "n_layers"], 12);
    let ff = get(&["intermediate_size", "hidden_dim"], 4 * h);
    let pos = get(&["max_position_embeddings"], 512);
    let per_layer = (4 * h * h + 4 * h).saturating_add(2 * h * ff + ff + h).saturating_add(4 * h);
    (vocab + pos + 2).saturating_mul(h).saturating_add(layers.saturating_mul(per_layer)).saturating_add(h * h + vocab)
}

/// Refuses, before allocating, a CPU model whose fp32 weights alone exceed the
/// memory available (a GPU reports its own out-of-memory errors).
/// Every model is built in host memory first ([`MaskedLm::from_config_json`]).
fn check_fits_in_memory(c: &serde_json::Value) -> Result<()> {
    let bytes = estimate_parameters(c).saturating_mul(4);
    if let Some(avail) = available_memory() {
        if bytes > avail {
            bail!(
                "the model of this config.json has about {:.1}B parameters ({:.1} GiB in fp32), more than the {:.1} GiB \
                 of memory available: check its sizes (hidden_size, num_hidden_layers, vocab_size, intermediate_size)",
                estimate_parameters(c) as f64 / 1e9,
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Dropout masks per stage: in training, the embeddings and each layer draw
/// from libtorch's generator seeded afresh (from one draw of the generator at
/// the start of the forward pass), so a layer run again by activation
/// checkpointing draws the masks it drew the first time.
#[derive(Debug, Clone, Copy)]
pub struct DropoutSeeds(Option<i64>);

impl DropoutSeeds {
    /// One draw from the CPU generator (no device sync); nothing when not training.
    pub fn draw(train: bool) -> Self {
        Self(train.then(|| Tensor::randint(1i64 << 52, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0])))
    }

    /// Seeds the generators for stage `stage` (0: embeddings, i + 1: layer i).
    pub fn before(&self, stage: usize) {
        if let Some(base) = self.0 {
            tch::manual_seed(base.wrapping_add(stage as i64));
        }
    }
}

/// What [`MaskedLm::load_dir`] did with the checkpoint's names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Our parameters the checkpoint lacks: they keep their fresh initialisation.
    pub missing: Vec<String>,
    /// Checkpoint names that are not part of the model (e.g. `pooler.dense.weight`).
    pub unexpected: Vec<String>,
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
}

/// What every architecture gives [`MaskedLm`]: one file per model implements it
/// (`impl Encoder for BertForMaskedLM` at the end of `bert.rs`, ...).
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
    /// Each layer's query, key and value projections (for [`MaskedLm::fuse_qkv`]).
    fn qkv_projections(&mut self) -> Vec<&mut QkvProjection>;
}

/// A masked language model: parameters (`vs`, HF names), architecture and config.
pub struct MaskedLm {
    pub vs: VarStore,
    pub arch: Arch,
    /// The original `config.json`, written back by [`MaskedLm::save_dir`].
    pub config_json: serde_json::Value,
    net: Box<dyn Encoder>,
}

impl MaskedLm {
    /// A randomly initialised model (as `transformers` initialises it) from a `config.json`.
    pub fn from_config_file(path: &Path, device: Device) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_config_json(json, device).with_context(|| format!("building the model of {}", path.display()))
    }

    /// A randomly initialised model from the contents of a `config.json`,
    /// built on the CPU and then moved to `device`: libtorch's CPU generator
    /// (mt19937) draws the weights whatever the device, so one seed gives the
    /// same model on a CPU and a GPU (CUDA's Philox would draw others).
    pub fn from_config_json(config_json: serde_json::Value, device: Device) -> Result<Self> {
        let mut model = Self::build_on_cpu(config_json)?;
        model.vs.set_device(device);
        Ok(model)
    }

    /// [`Self::from_config_json`] on the CPU.
    fn build_on_cpu(config_json: serde_json::Value) -> Result<Self> {
        let arch = check_config(&config_json)?;
        check_fits_in_memory(&config_json)?;
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let net: Box<dyn Encoder> = match arch {
            Arch::Bert => {
                let c: BertConfig = serde_json::from_value(config_json.clone()).context("reading BERT config.json")?;
                Box::new(BertForMaskedLM::new(&root, c)?)
            }
            Arch::DistilBert => {
                let c: DistilBertConfig =
                    serde_json::from_value(config_json.clone()).context("reading DistilBERT config.json")?;
                Box::new(DistilBertForMaskedLM::new(&root, c)?)
            }
            Arch::Roberta | Arch::XlmRoberta => {
                let c: RobertaConfig =
                    serde_json::from_value(config_json.clone()).context("reading RoBERTa config.json")?;
                Box::new(RobertaForMaskedLM::new(&root, c)?)
            }
            Arch::DebertaV2 => {
                let c: DebertaV2Config =
                    serde_json::from_value(config_json.clone()).context("reading DeBERTa-v2 config.json")?;
                Box::new(DebertaV2ForMaskedLM::new(&root, c)?)
            }
        };
        Ok(Self { vs, arch, config_json, net })
    }

    /// Loads `dir/config.json` and the weights (`model.safetensors`, its shards, or
    /// `pytorch_model.bin`). Parameters the checkpoint lacks (e.g. the MLM head of a
    /// `BertModel`) keep their initialisation and are reported as missing.
    pub fn load_dir(dir: &Path, device: Device) -> Result<(Self, LoadReport)> {
        // Loaded on the CPU, then moved: the device holds one copy of the weights.
        let mut model = Self::from_config_file(&dir.join("config.json"), Device::Cpu)?;
        let (file, tensors) = weights::read_dir(dir)?;
        let report = weights::load_into(&model.vs, model.arch, tensors, &file)?;
        model.vs.set_device(device);
        Ok((model, report))
    }

    /// Writes `config.json` (architectures = the MLM class) and `model.safetensors`
    /// (fp32, the names `save_pretrained` writes) into `dir`, creating it.
    pub fn save_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut config = self.config_json.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("architectures".into(), serde_json::json!([self.arch.mlm_class()]));
            obj.insert("model_type".into(), self.arch.model_type().into());
            if self.arch == Arch::DebertaV2 {
                // Our head names are those of the legacy layout (`cls.predictions.*`),
                // whatever layout the loaded checkpoint had.
                obj.insert("legacy".into(), true.into());
            }
            for key in ["dtype", "torch_dtype"] {
                if obj.contains_key(key) {
                    obj.insert(key.into(), "float32".into());
                }
            }
        }
        let path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&config)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        weights::write_safetensors(&self.vs, &dir.join("model.safetensors"))
    }

    /// `input_ids` [b, s] i64, `attention_mask` [b, s] (1 = token, 0 = pad;
    /// `None`: no padding, as every training block, so that attention may take
    /// the fastest kernel (flash) and no mask is built or read)
    /// -> last hidden state [b, s, h] in the weights' dtype. Dropout only if `train`.
    pub fn forward_hidden(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Tensor {
        let s = input_ids.size().get(1).copied().unwrap_or(0);
        assert!(
            s <= self.max_positions(),
            "sequence length {s} exceeds the model's {} positions",
            self.max_positions()
        );
        let dropout = DropoutSeeds::draw(train);
        dropout.before(0);
        let (mut x, inputs) = self.net.embed(input_ids, attention_mask, train);
        for i in 0..self.net.num_layers() {
            dropout.before(i + 1);
            x = self.net.layer(i, &x, &inputs, train);
        }
        x
    }

    /// The stages of [`MaskedLm::forward_hidden`], for activation checkpointing.
    pub fn embed(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> (Tensor, LayerInputs) {
        self.net.embed(input_ids, attention_mask, train)
    }

    pub fn num_layers(&self) -> usize {
        self.net.num_layers()
    }

    pub fn layer(&self, i: usize, x: &Tensor, inputs: &LayerInputs, train: bool) -> Tensor {
        self.net.layer(i, x, inputs, train)
    }

    /// Fuses each layer's query, key and value projections that lie back to
    /// back in `buffer`, the flat buffer every parameter is a view of
    /// (`src/model/qkv.rs`), and returns the fused leaves: from then on the
    /// forward pass differentiates those, not the separate weights.
    pub fn fuse_qkv(&mut self, buffer: &Tensor) -> Vec<FusedLeaves> {
        self.net.qkv_projections().into_iter().flat_map(|p| p.fuse(buffer)).collect()
    }

    /// The MLM head: `hidden` [..., h] -> logits [..., vocab]. Apply it to the masked
    /// positions only to skip most of the vocabulary projection.
    pub fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        self.net.mlm_head(hidden)
    }

    /// `forward_hidden` then `mlm_head`: [b, s, vocab].
    pub fn logits(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, train: bool) -> Tensor {
        self.mlm_head(&self.forward_hidden(input_ids, attention_mask, train))
    }

    /// The dtype of the weights (of the first parameter).
    pub fn kind(&self) -> Kind {
        self.vs.variables().values().next().map_or(Kind::Float, |t| t.kind())
    }

    /// One line saying which attention kernel a training pass of `seq` tokens
    /// in `kind` gets on `device` ([`layers::sdpa_kernel`]).
    pub fn attention_kernel_line(&self, device: Device, kind: Kind, seq: i64) -> String {
        let Ok(shape) = shape::ModelShape::from_config(&self.config_json) else {
            return "attention kernel: unknown (the config gives no shape)".into();
        };
        let (heads, head_dim) = (shape.heads as i64, (shape.hidden / shape.heads.max(1)) as i64);
        let bias = shape.relative.is_some();
        let written_out = if shape.arch == Arch::DebertaV2 {
            deberta_attention::writes_scores_out(device, kind)
        } else {
            layers::writes_scores_out(device, kind, shape.attention_dropout)
        };
        let kernel = if written_out {
            match kind {
                Kind::BFloat16 if gemm_via_f32(device, kind) => {
                    "scores written out (fp32 matmuls and softmax; this CPU has no bf16 instructions, so every \
                     bf16 GEMM runs as an fp32 one)"
                }
                Kind::BFloat16 => "scores written out (bf16 matmuls, fp32 softmax)",
                _ => "scores written out (matmuls, softmax)",
            }
        } else {
            layers::sdpa_kernel(device, kind, heads, seq, head_dim, bias, shape.attention_dropout)
        };
        let mask = if bias { "the relative-position bias" } else { "no mask (blocks have no padding)" };
        format!("attention: {kernel} on {device:?} ({kind:?}, {heads} heads of {head_dim}, {seq} tokens, {mask})")
    }

    pub fn vocab_size(&self) -> i64 {
        self.net.vocab_size()
    }

    /// The longest sequence the model takes: `max_position_embeddings`, less
    /// RoBERTa's `pad_token_id + 1` positions that are never used.
    pub fn max_positions(&self) -> i64 {
        self.net.max_positions()
    }

    pub fn hidden_size(&self) -> i64 {
        self.net.hidden_size()
    }

    /// Number of scalar parameters (the tied decoder counted once, as HF does).
    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    /// A second model with a copy of these weights in `kind` (e.g. the bf16 compute
    /// copy of fp32 master weights); the two share no storage.
    /// Built with zeros, not random draws ([`layers::without_random_init`]):
    /// making the copy leaves libtorch's generator where it was.
    pub fn to_kind_copy(&self, kind: Kind) -> Result<MaskedLm> {
        let mut copy = layers::without_random_init(|| Self::build_on_cpu(self.config_json.clone()))?;
        copy.vs.set_device(self.vs.device());
        copy.vs.copy(&self.vs).context("copying weights")?;
        copy.vs.set_kind(kind);
        Ok(copy)
    }

    /// Whether AdamW skips weight decay for this parameter: biases and LayerNorm weights.
    pub fn no_decay(name: &str) -> bool {
        name.ends_with("bias") || name.contains("LayerNorm.") || name.contains("layer_norm.")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(model_type: &str) -> MaskedLm {
        let config = serde_json::json!({
            "model_type": model_type, "vocab_size": 50, "hidden_size": 16, "dim": 16,
            "num_hidden_layers": 1, "n_layers": 1, "num_attention_heads": 2, "n_heads": 2,
            "intermediate_size": 24, "hidden_dim": 24, "max_position_embeddings": 12,
        });
        MaskedLm::from_config_json(config, Device::Cpu).unwrap()
    }

    #[test]
    fn no_mask_gives_what_an_all_ones_mask_gives_and_attention_says_its_kernel() {
        let deberta = serde_json::json!({
            "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 12,
            "relative_attention": true, "position_buckets": 4, "pos_att_type": ["p2c", "c2p"],
            "position_biased_input": false,
        });
        let models = [
            tiny("bert"),
            tiny("distilbert"),
            tiny("roberta"),
            MaskedLm::from_config_json(deberta, Device::Cpu).unwrap(),
        ];
        let ids = Tensor::from_slice(&[2i64, 7, 9, 3, 4, 5, 6, 8]).view([2, 4]);
        let ones = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
        for model in &models {
            let with = model.logits(&ids, Some(&ones), false);
            let without = model.logits(&ids, None, false);
            let diff = (with - without).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{}: {diff}", model.config_json["model_type"]);
            let line = model.attention_kernel_line(Device::Cpu, Kind::Float, 4);
            assert!(line.starts_with("attention: ") && !line.contains("none (no kernel"), "{line}");
        }
        assert!(models[0].attention_kernel_line(Device::Cpu, Kind::Float, 4).contains("no mask"));
        let deberta = models[3].attention_kernel_line(Device::Cpu, Kind::Float, 4);
        assert!(deberta.contains("relative-position bias") && deberta.contains("scores written out"), "{deberta}");
        // libtorch's CPU dispatcher takes its flash kernel for attention without a mask.
        assert_eq!(layers::sdpa_kernel(Device::Cpu, Kind::Float, 2, 128, 64, false, 0.0), "flash attention");
    }

    #[test]
    fn bf16_copies_run_forward_and_stay_close_to_fp32() {
        for model_type in ["bert", "distilbert"] {
            let model = tiny(model_type);
            let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
            let ids = Tensor::from_slice(&[2i64, 7, 9, 3, 4, 0, 0, 0]).view([2, 4]);
            let mask = ids.ne(0).to_kind(Kind::Int64);
            let _ = mask.get(0).fill_(1);
            let full = model.logits(&ids, Some(&mask), false);
            let half = bf16.logits(&ids, Some(&mask), false);
            assert_eq!(half.kind(), Kind::BFloat16);
            assert_eq!(half.size(), [2, 4, 50]);
            let diff = (half.to_kind(Kind::Float) - full).abs().max().double_value(&[]);
            assert!(diff < 0.05, "{model_type}: bf16 vs fp32 max abs diff {diff}");
            // Training mode (dropout) also runs in bf16.
            let _ = bf16.logits(&ids, Some(&mask), true).sum(Kind::Float).double_value(&[]);
        }
    }

    #[test]
    fn random_init_follows_transformers() {
        let model = tiny("bert");
        let vars = model.vs.variables();
        let word = &vars["bert.embeddings.word_embeddings.weight"];
        assert_eq!(word.get(0).abs().sum(Kind::Float).double_value(&[]), 0.0, "padding row is zero");
        let std = f64::try_from(word.narrow(0, 1, 49).std(true)).unwrap();
        assert!((std - 0.02).abs() < 0.004, "word embedding std {std}");
        assert_eq!(f64::try_from(vars["cls.predictions.bias"].abs().sum(Kind::Float)).unwrap(), 0.0);
        assert_eq!(f64::try_from(vars["bert.embeddings.LayerNorm.weight"].mean(Kind::Float)).unwrap(), 1.0);
    }

    #[test]
    fn unsupported_model_type_is_named() {
        let err = MaskedLm::from_config_json(serde_json::json!({"model_type": "gpt2"}), Device::Cpu).err().unwrap();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }

    #[test]
    fn no_decay_covers_biases_and_layer_norms() {
        assert!(MaskedLm::no_decay("cls.predictions.bias"));
        assert!(MaskedLm::no_decay("bert.encoder.layer.0.output.LayerNorm.weight"));
        assert!(MaskedLm::no_decay("distilbert.transformer.layer.0.sa_layer_norm.weight"));
        assert!(MaskedLm::no_decay("vocab_layer_norm.weight"));
        assert!(!MaskedLm::no_decay("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(!MaskedLm::no_decay("bert.embeddings.word_embeddings.weight"));
        assert!(MaskedLm::no_decay("lm_head.bias"));
        assert!(MaskedLm::no_decay("lm_head.layer_norm.weight"));
        assert!(MaskedLm::no_decay("roberta.embeddings.LayerNorm.weight"));
        assert!(MaskedLm::no_decay("deberta.encoder.LayerNorm.weight"));
        assert!(MaskedLm::no_decay("cls.predictions.transform.LayerNorm.bias"));
        assert!(MaskedLm::no_decay("deberta.encoder.layer.0.attention.self.pos_key_proj.bias"));
        assert!(!MaskedLm::no_decay("deberta.encoder.rel_embeddings.weight"));
        assert!(!MaskedLm::no_decay("deberta.encoder.layer.0.attention.self.query_proj.weight"));
    }

    fn tiny_deberta(extra: serde_json::Value) -> Result<MaskedLm> {
        let mut config = serde_json::json!({
            "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
            "max_position_embeddings": 12, "relative_attention": true, "position_buckets": 4,
            "share_att_key": true, "pos_att_type": "p2c|c2p", "norm_rel_ebd": "layer_norm",
            "position_biased_input": false,
        });
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        MaskedLm::from_config_json(config, Device::Cpu)
    }

    #[test]
    fn new_architectures_run_in_bf16_too() {
        for model in [tiny("roberta"), tiny_deberta(serde_json::json!({})).unwrap()] {
            let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
            let ids = Tensor::from_slice(&[0i64, 7, 9, 2, 0, 5, 2, 1]).view([2, 4]);
            let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 0]).view([2, 4]);
            let full = model.logits(&ids, Some(&mask), false);
            let half = bf16.logits(&ids, Some(&mask), true);
            assert_eq!(half.kind(), Kind::BFloat16);
            assert_eq!(full.size(), [2, 4, 50]);
            let diff =
                (bf16.logits(&ids, Some(&mask), false).to_kind(Kind::Float) - full).abs().max().double_value(&[]);
            assert!(diff < 0.05, "{:?}: bf16 vs fp32 {diff}", model.arch);
        }
    }

    #[test]
    fn unsupported_deberta_options_are_refused_naming_the_key() {
        for (extra, key) in [
            (serde_json::json!({"conv_kernel_size": 4}), "conv_kernel_size"),
            (serde_json::json!({"conv_kernel_size": 3, "conv_act": "swish"}), "conv_act"),
            (serde_json::json!({"conv_kernel_size": 3, "conv_groups": 3}), "conv_groups"),
            (serde_json::json!({"attention_head_size": 4}), "attention_head_size"),
            (serde_json::json!({"pos_att_type": ["c2p", "p2p"]}), "pos_att_type"),
            (serde_json::json!({"norm_rel_ebd": "layer_norm|scale"}), "norm_rel_ebd"),
            (serde_json::json!({"hidden_act": "swish"}), "swish"),
            (serde_json::json!({"legacy": false, "embedding_size": 8}), "embedding_size"),
        ] {
            let err = format!("{:#}", tiny_deberta(extra.clone()).err().expect("refused"));
            assert!(err.contains(key) && err.contains("not supported"), "{extra}: {err}");
        }
        // attention_head_size equal to hidden_size / heads is what we compute.
        tiny_deberta(serde_json::json!({"attention_head_size": 8})).unwrap();
    }

    #[test]
    fn bert_and_roberta_as_decoders_are_refused() {
        for (model_type, key) in [("roberta", "is_decoder"), ("bert", "is_decoder"), ("bert", "add_cross_attention")] {
            let mut config = serde_json::json!({"model_type": model_type, "vocab_size": 50, "hidden_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 24,
                "max_position_embeddings": 12});
            config[key] = true.into();
            let err = format!("{:#}", MaskedLm::from_config_json(config, Device::Cpu).err().unwrap());
            assert!(err.contains("is_decoder / add_cross_attention"), "{model_type}: {err}");
        }
    }

    #[test]
    fn xlm_roberta_is_roberta_saved_under_its_own_class() {
        let model = tiny("xlm-roberta");
        assert_eq!(model.arch, Arch::XlmRoberta);
        assert!(model.vs.variables().contains_key("lm_head.layer_norm.weight"));
        assert_eq!(model.max_positions(), 10, "12 positions less pad_token_id 1 + 1");
        let dir = tempfile::tempdir().unwrap();
        model.save_dir(dir.path()).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "xlm-roberta");
        assert_eq!(config["architectures"][0], "XLMRobertaForMaskedLM");
    }

    /// Building draws from libtorch's global generator, which the other tests'
    /// threads draw from too: the check runs alone, in a child process.
    #[test]
    fn one_seed_gives_the_same_weights_on_every_device_and_copies_draw_nothing() {
        if std::env::var_os("MLM_SEEDED_BUILD_CHILD").is_none() {
            let name = "model::tests::one_seed_gives_the_same_weights_on_every_device_and_copies_draw_nothing";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--test-threads", "1", "--nocapture"])
                .env("MLM_SEEDED_BUILD_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let deberta = serde_json::json!({
            "model_type": "deberta-v2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 12,
            "relative_attention": true, "position_buckets": 4, "pos_att_type": "p2c|c2p",
            "position_biased_input": false,
        });
        let bert = tiny("bert").config_json;
        // On a GPU machine the build moves to the GPU: CUDA's generator must draw nothing.
        let device = Device::cuda_if_available();
        for config in [bert, deberta] {
            tch::manual_seed(7);
            let direct = MaskedLm::build_on_cpu(config.clone()).unwrap();
            tch::manual_seed(7);
            let moved = MaskedLm::from_config_json(config.clone(), device).unwrap();
            assert_eq!(moved.vs.device(), device);
            let direct_vars = direct.vs.variables();
            for (name, t) in moved.vs.variables() {
                let d = &direct_vars[&name];
                assert!(t.to_device(Device::Cpu).equal(d), "{}: {name} differs on {device:?}", config["model_type"]);
            }
            // A copy in another dtype is built without draws: the generator
            // is where the master's build left it.
            let after_build = Tensor::randn([8], (Kind::Float, Device::Cpu));
            tch::manual_seed(7);
            let master = MaskedLm::from_config_json(config.clone(), Device::Cpu).unwrap();
            let copy = master.to_kind_copy(Kind::BFloat16).unwrap();
            let after_copy = Tensor::randn([8], (Kind::Float, Device::Cpu));
            assert!(after_build.equal(&after_copy), "to_kind_copy drew from the generator");
            let master_vars = master.vs.variables();
            for (name, t) in copy.vs.variables() {
                assert_eq!(t.kind(), Kind::BFloat16);
                assert!(t.equal(&master_vars[&name].to_kind(Kind::BFloat16)), "{name} is not the master's");
            }
        }
    }
}
