//! Models: BERT-family encoders (BERT, DistilBERT, RoBERTa, XLM-R, CamemBERT,
//! DeBERTa-v2/v3, ModernBERT) with their masked-language-model heads, and the
//! GPT-2 family, a decoder with its language-model head (`Objective::Clm`: the
//! next token; `Encoder::decode` runs it over a key/value cache), read from and
//! written to Hugging Face's
//! layout (`config.json` + `model.safetensors`). `docs/models.md` lists the
//! config keys each honours and refuses. The "MLM head" of a decoder is its LM
//! head (GPT-2's `ln_f` + the tied `lm_head`).
//!
//! [`MaskedLm`] is what the rest of mlm sees: one type over the architectures,
//! holding the parameters in a `tch` VarStore whose names are Hugging Face's.
//! The compute dtype is the VarStore's: [`MaskedLm::to_kind_copy`] makes the bf16
//! compute copy of fp32 master weights.
//!
//! Each architecture is one file ending with its [`ArchSpec`] (model type, HF
//! class, weight names, builder, sizes), listed once in
//! [`ARCHITECTURES`]; every lookup goes through that list. Which
//! kernels run on a device in a dtype (GEMM route, attention path, dropout) is
//! decided by [`policy`] alone. The C++ the models call lives in `src/shims/`.
pub mod bert;
mod checks;
pub mod deberta;
mod deberta_attention;
pub mod distilbert;
pub mod gpt2;
mod layers;
mod linear_f32;
pub mod load;
pub mod modernbert;
pub mod policy;
mod qkv;
pub mod roberta;
pub mod shape;
mod spec;
mod torch_pickle;
pub mod weights;

use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

pub use bert::{BertConfig, BertForMaskedLM};
pub use checks::{available_memory, estimate_parameters};
pub use deberta::{DebertaV2Config, DebertaV2ForMaskedLM};
pub use distilbert::{DistilBertConfig, DistilBertForMaskedLM};
pub use gpt2::{Gpt2Config, Gpt2LmHeadModel};
use policy::AttentionPath;
pub use qkv::FusedLeaves;
pub use roberta::{RobertaConfig, RobertaForMaskedLM};
use shape::ModelShape;
use spec::Encoder;
pub use spec::{Arch, ArchSpec, KvCache, LayerInputs, NameMap, Objective};
pub use weights::LoadReport;

/// The registry: one line per architecture (with its `mod` line above), whose
/// spec ends its file. Every lookup goes through it: `config.json` -> [`Arch`]
/// (by `model_type`, or by the class name when that is absent), and from it
/// the network, the weight names, the sizes and the class a saved model names.
pub static ARCHITECTURES: &[&ArchSpec] = &[
    &bert::SPEC,
    &distilbert::SPEC,
    &roberta::SPEC,
    &roberta::XLM_ROBERTA_SPEC,
    &roberta::CAMEMBERT_SPEC,
    &deberta::SPEC,
    &modernbert::SPEC,
    &gpt2::SPEC,
];

impl Arch {
    /// From `model_type`, or when that is absent, the first `architectures` entry.
    pub fn from_config(config: &serde_json::Value) -> Result<Self> {
        if let Some(model_type) = config.get("model_type").and_then(|v| v.as_str()) {
            return match Self::from_model_type(model_type) {
                Some(arch) => Ok(arch),
                None => bail!("model_type {model_type:?} in config.json is not supported (supported: {})", supported()),
            };
        }
        let class = config.pointer("/architectures/0").and_then(|v| v.as_str()).unwrap_or("");
        match ARCHITECTURES.iter().find(|spec| class.starts_with(spec.class_prefix)) {
            Some(spec) => Ok(Self(spec)),
            None => bail!(
                "config.json has no model_type and its architecture {class:?} is not supported (supported: {})",
                supported()
            ),
        }
    }

    /// The architecture whose `model_type` is `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        ARCHITECTURES.iter().find(|spec| spec.model_type == model_type).map(|spec| Self(spec))
    }
}

/// The supported `model_type`s, for messages.
fn supported() -> String {
    ARCHITECTURES.iter().map(|spec| spec.model_type).collect::<Vec<_>>().join(", ")
}

/// The architecture of a `config.json`, after the checks every architecture
/// shares (sizes and probabilities in range, a tied decoder).
fn check_config(c: &serde_json::Value) -> Result<Arch> {
    let arch = Arch::from_config(c)?;
    checks::check_shared(c)?;
    Ok(arch)
}

impl ModelShape {
    /// Reads and checks `config.json`'s contents: its architecture's
    /// [`ArchSpec::shape`].
    pub fn from_config(c: &serde_json::Value) -> Result<Self> {
        let arch = check_config(c)?;
        (arch.spec().shape)(c)
    }
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

    /// [`Self::from_config_json`] on the CPU: the network its architecture's
    /// spec builds ([`ArchSpec`]).
    fn build_on_cpu(config_json: serde_json::Value) -> Result<Self> {
        let arch = check_config(&config_json)?;
        checks::check_fits_in_memory(&config_json)?;
        let vs = VarStore::new(Device::Cpu);
        let net = (arch.spec().build)(&vs.root(), &config_json)?;
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
            for (key, value) in self.arch.spec().saved_flags {
                obj.insert(key.to_string(), (*value).into());
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

    /// The parameters that must lie back to back in the flat buffer for
    /// [`Self::fuse_qkv`] to fuse them, by name: for every layer, its query,
    /// key and value weights, and their biases (two groups). Read from the
    /// layers themselves (each projection's tensors are found among the var
    /// store's by storage), so no architecture names them twice.
    pub fn qkv_groups(&mut self) -> Vec<Vec<String>> {
        let names: std::collections::HashMap<usize, String> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.numel() > 0)
            .map(|(name, t)| (t.data_ptr() as usize, name))
            .collect();
        let name_of = |t: &Tensor| names.get(&(t.data_ptr() as usize)).cloned();
        let mut groups = Vec::new();
        for p in self.net.qkv_projections() {
            let linears = [&p.query, &p.key, &p.value];
            groups.extend(linears.iter().map(|l| name_of(&l.weight)).collect::<Option<Vec<_>>>());
            groups.extend(linears.iter().map(|l| name_of(&l.bias)).collect::<Option<Vec<_>>>());
        }
        groups
    }

    /// The MLM head: `hidden` [..., h] -> logits [..., vocab]. Apply it to the masked
    /// positions only to skip most of the vocabulary projection.
    pub fn mlm_head(&self, hidden: &Tensor) -> Tensor {
        self.net.mlm_head(hidden)
    }

    /// A decoder's next-token logits [b, n, vocab] (fp32) for `input_ids`
    /// [b, n] following the positions in `cache`, appending theirs to it
    /// (generation: each new token costs one position). An encoder is refused.
    pub fn decode_logits(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.decode_hidden(input_ids, cache)?;
        Ok(tch::no_grad(|| self.mlm_head(&hidden).to_kind(Kind::Float)))
    }

    /// [`Self::decode_logits`] before the head: the final hidden states
    /// [b, n, h], for a caller that needs the logits of some positions only
    /// (generation: the last one).
    pub fn decode_hidden(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let n = input_ids.size().get(1).copied().unwrap_or(0);
        if cache.len + n > self.max_positions() {
            bail!(
                "generating past the model's {} positions ({} in the cache, {n} more)",
                self.max_positions(),
                cache.len
            );
        }
        match tch::no_grad(|| self.net.decode(input_ids, cache)) {
            Some(h) => Ok(h),
            None => bail!("{} is an encoder (a masked LM): it cannot generate text", self.arch.model_type()),
        }
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
    /// in `kind` gets on `device` ([`policy::attention_path`], [`policy::sdpa_kernel`]).
    pub fn attention_kernel_line(&self, device: Device, kind: Kind, seq: i64) -> String {
        let Ok(shape) = ModelShape::from_config(&self.config_json) else {
            return "attention kernel: unknown (the config gives no shape)".into();
        };
        let (heads, head_dim) = (shape.heads as i64, (shape.hidden / shape.heads.max(1)) as i64);
        let bias = shape.relative.is_some();
        let kernel = match policy::attention_path(shape.attention, device, kind, shape.attention_dropout) {
            AttentionPath::WrittenOut => match kind {
                Kind::BFloat16 if policy::gemm_via_f32(device, kind) => {
                    "scores written out (fp32 matmuls and softmax; this CPU has no bf16 instructions, so every \
                     bf16 GEMM runs as an fp32 one)"
                }
                Kind::BFloat16 => "scores written out (bf16 matmuls, fp32 softmax)",
                _ => "scores written out (matmuls, softmax)",
            },
            AttentionPath::Sdpa => {
                policy::sdpa_kernel(device, kind, heads, seq, head_dim, bias, shape.attention_dropout)
            }
        };
        let mask = if bias {
            "the relative-position bias"
        } else if shape.modern.is_some_and(|m| m.windowed) {
            "no mask in the global layers (blocks have no padding), a band bias in the sliding-window layers"
        } else if self.arch.objective() == Objective::Clm {
            "causal, no padding mask (blocks have no padding)"
        } else {
            "no mask (blocks have no padding)"
        };
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

    /// Whether AdamW skips weight decay for this parameter: biases and
    /// LayerNorm weights, as HF's Trainer decides (`LayerNorm.`, `layer_norm.`,
    /// a module named `norm` or `*_norm`: ModernBERT's `norm`, `attn_norm`,
    /// `mlp_norm`, `final_norm`; GPT-2's `ln_1`, `ln_2` and `ln_f`).
    pub fn no_decay(name: &str) -> bool {
        let module = name.rsplit('.').nth(1).unwrap_or("");
        name.ends_with("bias")
            || name.contains("LayerNorm.")
            || name.contains("layer_norm.")
            || name.contains(".ln_")
            || module == "norm"
            || module.ends_with("_norm")
    }
}

#[cfg(test)]
mod tests;
