//! Job configuration: one TOML file per job, parsed into plain structs.
//!
//! Every section denies unknown keys, every key has a documented default (see
//! `docs/config.md`), and `--set section.key=value` overrides any key before the
//! structs are built, so an override is checked exactly like the file.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

mod batch;
mod checkpoint;
mod data;
pub mod hub;
mod micro_batch;
mod validate;

pub use batch::{BatchShape, DEFAULT_BATCH_SIZE};
pub use checkpoint::{CheckpointConfig, Resume, SaveSignal};
pub use data::{DataConfig, DocumentBoundary, InputFormat, InvalidUtf8, DEFAULT_TEST_FRACTION, DEFAULT_TEST_SIZE};
pub use micro_batch::{nearest_divisors, MicroBatchSize};

/// The most tokens `data.test_size` may hold (the test candidates stay in
/// memory while the store is written: 4 bytes a token).
pub const MAX_TEST_TOKENS: usize = 1 << 25;

/// A whole job.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    pub eval: EvalConfig,
    pub checkpoint: CheckpointConfig,
    pub distributed: DistributedConfig,
    pub logging: LoggingConfig,
}

/// `[model]`: where the weights and the tokenizer come from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Hugging Face model directory (`config.json` + `model.safetensors` or
    /// `pytorch_model.bin`), or a Hub name (`org/name`) found in the local
    /// hub cache ([`hub`]). Mutually exclusive with `config`.
    pub path: Option<PathBuf>,
    /// The Hub revision of a `path` given by name (a branch, tag or commit);
    /// `main` when unset. (Not written when unset: the hash of a job's
    /// settings stays what it was before the key existed.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// A `config.json` alone: the model starts from random weights.
    pub config: Option<PathBuf>,
    /// `tokenizer.json`; defaults to `<path>/tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    /// bf16 compute copies of the weights, fp32 master weights and optimizer.
    Bf16,
    /// fp16 compute copies of the weights, fp32 master weights and optimizer,
    /// and a dynamic loss scale ([`LossScaleConfig`]).
    Fp16,
}

impl Precision {
    /// The dtype the forward and backward compute in.
    pub fn compute_kind(self) -> tch::Kind {
        match self {
            Precision::Fp32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
            Precision::Fp16 => tch::Kind::Half,
        }
    }
}

/// `[training.loss_scale]`: the dynamic loss scale of `precision = "fp16"`,
/// with `torch.amp.GradScaler`'s defaults and rules: the loss is multiplied by
/// the scale before backward; a step whose gradient holds an inf/NaN is
/// skipped and the scale multiplied by `backoff_factor`; after
/// `growth_interval` clean steps in a row it is multiplied by `growth_factor`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LossScaleConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

impl LossScaleConfig {
    /// Left out of the written config (and so of its hash) at the defaults:
    /// checkpoints written before the key existed resume unchanged.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// The GPU when one is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `[training]`: the optimisation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Checkpoints, metrics and (by default) prepared data go here; relative
    /// paths are relative to the config file's folder.
    pub output_dir: PathBuf,
    pub seed: u64,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: usize,
    /// Examples per loader batch (per worker); `grad_accum_steps` of them make a
    /// step. Absent: 8, or derived from `global_batch_size` ([`BatchShape`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Examples per forward pass: splits each batch without changing the step.
    pub micro_batch_size: MicroBatchSize,
    /// Loader batches per optimizer step. Absent: 1, or derived from
    /// `global_batch_size` and `batch_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum_steps: Option<usize>,
    /// Examples per optimizer step over all workers: the batch that shapes the
    /// job, split over whatever number of workers runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch_size: Option<usize>,
    pub lr: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Warmup as a fraction of the total steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Global gradient-norm clipping (0: off).
    pub max_grad_norm: f64,
    pub precision: Precision,
    /// The dynamic loss scale of `precision = "fp16"`.
    #[serde(skip_serializing_if = "LossScaleConfig::is_default")]
    pub loss_scale: LossScaleConfig,
    pub device: DeviceChoice,
    /// Intra-op CPU threads for libtorch (0: libtorch's default).
    pub threads: usize,
    /// Log the training loss every this many optimizer steps.
    pub log_every: usize,
    /// Peak TFLOP/s of one device in the compute precision, for the model FLOPs
    /// utilisation in the logs (0: not logged). `mlm bench-peak` measures it.
    pub peak_tflops: f64,
    /// Stop after this many optimizer steps in a row with a non-finite loss or
    /// gradient (each such step is skipped: the weights are not updated).
    pub max_nonfinite_steps: usize,
    /// Compute the vocabulary projection only at masked positions (same loss
    /// and gradients as the dense head, less work).
    pub sparse_head: bool,
    /// `"mlm"` (masked) or `"clm"` (causal: predict every next token); unset:
    /// what the model is (a decoder-only model is `clm`), and a value the
    /// model cannot train is refused naming both. (Not written when unset.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<crate::model::Objective>,
    /// Keep only each encoder layer's input during forward and run the layer
    /// again in backward: far less activation memory for ~1/3 more compute.
    pub activation_checkpointing: bool,
    /// On CUDA, fp32 matmuls as TF32 (`torch.set_float32_matmul_precision("high")`).
    pub tf32: bool,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("runs/mlm"),
            seed: 42,
            epochs: 1,
            max_steps: 0,
            batch_size: None,
            micro_batch_size: MicroBatchSize::Whole,
            grad_accum_steps: None,
            global_batch_size: None,
            lr: 5e-5,
            weight_decay: 0.01,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            schedule: Schedule::Linear,
            max_grad_norm: 1.0,
            precision: Precision::Fp32,
            loss_scale: LossScaleConfig::default(),
            device: DeviceChoice::Auto,
            threads: 0,
            log_every: 10,
            peak_tflops: 0.0,
            max_nonfinite_steps: 5,
            sparse_head: true,
            objective: None,
            activation_checkpointing: false,
            tf32: true,
        }
    }
}

/// `[eval]`: held-out perplexity and fill-mask probes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many optimizer steps (0: only at epoch ends).
    pub every_steps: usize,
    /// Evaluate before the first step (the "before" perplexity).
    pub at_start: bool,
    pub at_epoch_end: bool,
    pub batch_size: usize,
    /// Evaluate on at most this many test chunks (0: all).
    pub max_chunks: usize,
    /// Seed of the fixed evaluation masks.
    pub mask_seed: u64,
    /// Sentences with the mask token, predicted before and after training.
    pub fill_mask: Vec<String>,
    pub top_k: usize,
    /// Causal LM: prompts continued (greedily) before and after training.
    pub prompts: Vec<String>,
    /// Tokens each of `prompts` is continued by.
    pub max_new_tokens: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            at_start: true,
            at_epoch_end: true,
            batch_size: 16,
            max_chunks: 0,
            mask_seed: 1234,
            fill_mask: Vec::new(),
            top_k: 5,
            prompts: Vec::new(),
            max_new_tokens: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// `mpi` under mpirun/srun, `nccl` for GPU workers of mlm-launch, `tcp` for
    /// its CPU workers, `local` for a single process.
    #[default]
    Auto,
    Local,
    Tcp,
    Mpi,
    Nccl,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CommDtype {
    #[default]
    Fp32,
    Bf16,
}

/// `[distributed]`: how workers talk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    pub backend: Backend,
    /// dtype of the gradient all-reduce.
    pub comm_dtype: CommDtype,
    /// Seconds a worker waits for its peers before failing.
    pub timeout_s: u64,
    /// Elements per all-reduce bucket (0: the whole gradient at once).
    pub bucket_elems: usize,
    /// All-reduce each layer's gradients while backward runs on the layers below.
    pub overlap: bool,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self { backend: Backend::Auto, comm_dtype: CommDtype::Fp32, timeout_s: 300, bucket_elems: 0, overlap: true }
    }
}

/// When progress bars are drawn.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    /// When stderr is a terminal.
    #[default]
    Auto,
    Always,
    Never,
}

/// `[logging]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Progress bars: "auto" (when attached to a terminal), "always", "never".
    pub progress: ProgressMode,
    /// JSON-lines metrics file, relative to the output directory.
    pub metrics_file: String,
    /// Also write the metrics as TensorBoard scalars in `<output_dir>/tb/`.
    pub tensorboard: bool,
    /// When stderr is not a terminal: seconds between progress lines (0: none).
    pub progress_every_s: f64,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            progress: ProgressMode::Auto,
            metrics_file: "metrics.jsonl".into(),
            tensorboard: false,
            progress_every_s: 60.0,
        }
    }
}

impl Config {
    /// Reads `path`, applies `key=value` overrides, and resolves relative paths
    /// against the config file's folder.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut value: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        // Without overrides, parse the text itself: its errors carry line and column.
        let parsed = if overrides.is_empty() {
            toml::from_str::<Config>(&text).map_err(|e| one_line(&e.to_string()))
        } else {
            for o in overrides {
                apply_override(&mut value, o)?;
            }
            Config::deserialize(value).map_err(|e| locate(&text, &e))
        };
        let mut cfg = parsed.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        cfg.resolve_paths(&base).with_context(|| format!("{}: [model] path", path.display()))?;
        cfg.validate().with_context(|| format!("invalid config {}", path.display()))?;
        Ok(cfg)
    }

    /// Parses a config from TOML text (paths stay as written).
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!(one_line(&e.to_string())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_paths(&mut self, base: &Path) -> Result<()> {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        if let Some(p) = self.model.path.as_mut() {
            *p = normalize(&hub::resolve_model(p, base, self.model.revision.as_deref())?);
        }
        if let Some(p) = self.model.config.as_mut() {
            fix(p)
        }
        if let Some(p) = self.model.tokenizer.as_mut() {
            fix(p)
        }
        if let Some(p) = self.data.prepared_dir.as_mut() {
            fix(p)
        }
        if let Resume::Path(p) = &mut self.checkpoint.resume {
            fix(p);
        }
        if !self.training.output_dir.as_os_str().is_empty() {
            fix(&mut self.training.output_dir);
        }
        for f in self.data.files.iter_mut().chain(self.data.eval_files.iter_mut()) {
            if Path::new(f).is_relative() {
                *f = normalize(&base.join(&*f)).to_string_lossy().into_owned();
            }
        }
        Ok(())
    }

    /// Where the prepared token store lives.
    pub fn prepared_dir(&self) -> PathBuf {
        self.data.prepared_dir.clone().unwrap_or_else(|| self.training.output_dir.join("data"))
    }

    /// The tokenizer file.
    pub fn tokenizer_path(&self) -> PathBuf {
        match (&self.model.tokenizer, &self.model.path) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => p.join("tokenizer.json"),
            (None, None) => PathBuf::from("tokenizer.json"),
        }
    }
}

/// Applies one `section.key=value` (or `section.table.key=value`) override.
/// The value is parsed as TOML (numbers, booleans, arrays) and taken as a
/// string when it is not valid TOML.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let quoted = || crate::logging::excerpt(assignment);
    let (key, raw) =
        assignment.split_once('=').with_context(|| format!("--set {}: expected section.key=value", quoted()))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        bail!("--set {}: the key must be section.key (e.g. training.lr) or section.table.key", quoted());
    }
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, tables) = parts.split_last().expect("two or three parts");
    let mut at = table;
    for name in tables {
        let entry = at.entry(name.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(inner) = entry else {
            bail!("--set {}: `{name}` is not a section", quoted());
        };
        at = inner;
    }
    at.insert(last.to_string(), value);
    Ok(())
}

/// Removes `.` and `dir/..` pairs without touching the file system, so that
/// messages show `runs/demo` rather than `configs/../runs/demo`.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns a serde error on the parsed table into one line, adding the line of the
/// offending key in the file when we can find it (serde loses spans once the
/// table has been merged with overrides).
fn locate(text: &str, err: &toml::de::Error) -> String {
    let msg = one_line(&err.to_string());
    let key = msg
        .split('`')
        .nth(1)
        .filter(|_| msg.starts_with("unknown field") || msg.contains("invalid"))
        .map(str::to_string);
    if let Some(k) = key {
        if let Some((n, _)) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.trim_start().starts_with(&format!("{k} ")) || l.trim_start().starts_with(&format!("{k}=")))
        {
            return format!("line {}: {msg}", n + 1);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npath = \"m\"\n";

    #[test]
    fn defaults_fill_missing_keys() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.data.block_size, 128);
        assert_eq!(c.data.mlm_probability, 0.15);
        assert_eq!(c.training.precision, Precision::Fp32);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("{MIN}[training]\nlr = 1e-4\nlearning_rate = 3\n")).unwrap();
        let e = format!("{:#}", Config::load(&p, &[]).unwrap_err());
        assert!(e.contains("learning_rate") && e.contains("line 5"), "{e}");
    }

    #[test]
    fn overrides_replace_and_type_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, MIN).unwrap();
        let c = Config::load(&p, &["training.lr=3e-5".into(), "training.precision=bf16".into()]).unwrap();
        assert_eq!(c.training.lr, 3e-5);
        assert_eq!(c.training.precision, Precision::Bf16);
        let c = Config::load(&p, &["training.precision=fp16".into(), "training.loss_scale.growth_interval=3".into()])
            .unwrap();
        assert_eq!((c.training.precision, c.training.loss_scale.growth_interval), (Precision::Fp16, 3));
        assert_eq!(c.training.loss_scale.init_scale, 65536.0);
        let e = format!("{:#}", Config::load(&p, &["training.loss_scale.backoff_factor=1.0".into()]).unwrap_err());
        assert!(e.contains("training.loss_scale.backoff_factor = 1 must be in (0, 1)"), "{e}");
        let e = format!("{:#}", Config::load(&p, &["training.loss_scale.init=2".into()]).unwrap_err());
        assert!(e.contains("init"), "{e}");
        assert!(c.model.path.unwrap().starts_with(dir.path()));
        let e = format!("{:#}", Config::load(&p, &["training.batch_size=lots".into()]).unwrap_err());
        assert!(e.contains("batch_size") || e.contains("invalid type"), "{e}");
        assert!(Config::load(&p, &["training.batch_size=0".into()]).is_err());
    }

    #[test]
    fn eval_files_replace_the_test_fraction_and_a_contradiction_is_refused() {
        let with = |data: &str| Config::from_toml(&format!("{MIN}[data]\n{data}\n"));
        let c = with("eval_files = [\"valid.jsonl\"]").unwrap();
        assert_eq!((c.data.held_out_fraction(), c.data.eval_files.len()), (0.0, 1));
        assert_eq!(with("eval_files = [\"v.txt\"]\ntest_fraction = 0").unwrap().data.held_out_fraction(), 0.0);
        assert_eq!(with("").unwrap().data.held_out_fraction(), DEFAULT_TEST_FRACTION);
        assert_eq!(with("test_fraction = 0.2").unwrap().data.held_out_fraction(), 0.2);
        let e = with("eval_files = [\"v.txt\"]\ntest_fraction = 0.1").unwrap_err().to_string();
        assert!(e.contains("data.test_fraction = 0.1 and data.eval_files are both set"), "{e}");
        let e = with("test_fraction = 0").unwrap_err().to_string();
        assert!(e.contains("data.test_fraction = 0 must be in (0, 1)") && e.contains("data.eval_files"), "{e}");
        let e = with("eval_files = [\" \"]").unwrap_err().to_string();
        assert!(e.contains("data.eval_files has an empty entry"), "{e}");
        // ModernBERT's 8,192-token blocks: the default test_size (10,000 blocks)
        // would hold too many tokens to sample, but eval_files sample none.
        let e = with("block_size = 8192").unwrap_err().to_string();
        assert!(e.contains("data.test_size = 10000 blocks of data.block_size = 8192"), "{e}");
        assert_eq!(with("block_size = 8192\neval_files = [\"v.txt\"]").unwrap().data.block_size, 8192);
        assert_eq!(with("block_size = 8192\ntest_size = 4096").unwrap().data.block_size, 8192);
        // Relative to the config file's folder, as data.files.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, format!("{MIN}[data]\neval_files = [\"valid/*.txt\"]\n")).unwrap();
        assert_eq!(Config::load(&p, &[]).unwrap().data.eval_files, [format!("{}/valid/*.txt", dir.path().display())]);
    }

    #[test]
    fn data_settings_without_eval_files_serialize_as_before_the_key() {
        // What the checkpoints' config hash is taken over: unchanged for jobs
        // that do not use eval_files, so their checkpoints still resume.
        let v = serde_json::to_value(DataConfig::default()).unwrap();
        assert_eq!(v["test_fraction"], 0.05);
        assert!(v.get("eval_files").is_none(), "{v}");
        let set = DataConfig { test_fraction: Some(0.2), ..DataConfig::default() };
        assert_eq!(serde_json::to_value(set).unwrap()["test_fraction"], 0.2);
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                Config::load(&e.path(), &[]).unwrap_or_else(|err| panic!("{}: {err:#}", e.path().display()));
                n += 1;
            }
        }
        assert!(n >= 5, "demo, wiki, imdb, eli5, wikitext");
    }
}
