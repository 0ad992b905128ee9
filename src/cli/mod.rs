//! The `mlm` command line: `prepare`, `train`, `eval`, `fill-mask`, `doctor`,
//! `estimate-memory`.
use std::path::{Path, PathBuf};

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, DataConfig, DeviceChoice, DocumentBoundary, InputFormat};
use crate::data::loader::eval_batches;
use crate::data::masking::MaskingParams;
use crate::data::prepare::{prepare, tokenize_to_chunks};
use crate::data::store::TokenStore;
use crate::data::tokenizer::TextTokenizer;
use crate::device::select_device;
use crate::infer::fill_mask;
use crate::model::load::{check_vocab, load_for_inference};
use crate::progress::show_progress;
use crate::train::eval::evaluate;
use crate::train::resume::{self, Apply};

mod doctor;
mod estimate_memory;

#[derive(Parser, Debug)]
#[command(name = "mlm", version, about = "Masked-language-model training for BERT-family encoders")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Tokenize, chunk and split the corpus into the token store (reused when unchanged).
    Prepare {
        config: PathBuf,
        /// Override a config key: section.key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Train (prepares the data first when needed; resumes per checkpoint.resume).
    Train {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Same as --set checkpoint.resume=...: auto, none, or a checkpoint directory.
        #[arg(long)]
        resume: Option<String>,
    },
    /// Held-out perplexity of a model on text files (masks fixed by --seed).
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        #[arg(long, default_value_t = 128)]
        block_size: usize,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, value_enum, default_value = "auto")]
        format: FormatArg,
        #[arg(long, default_value = "text")]
        text_field: String,
        #[arg(long, default_value_t = 0.15)]
        mlm_probability: f64,
        /// Seed of the fixed evaluation masks, and of any weights the model lacks (an untrained MLM head).
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
    },
    /// Measure the peak matmul TFLOP/s of a device (for training.peak_tflops).
    BenchPeak {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        #[arg(long, value_enum, default_value = "bf16")]
        precision: PrecisionArg,
        /// Side of the square matrices.
        #[arg(long, default_value_t = 4096)]
        size: i64,
    },
    /// What this machine offers a job: libtorch, CUDA driver and GPUs, NCCL, MPI, CPU.
    Doctor,
    /// Predict a job's memory before launching it: training state, activations per
    /// micro-batch size with and without activation checkpointing, what fits.
    EstimateMemory(estimate_memory::Args),
    /// Predict the masked token(s); prints JSON lines like HF's fill-mask pipeline.
    FillMask {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        #[arg(required = true)]
        text: Vec<String>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// Seed of any weights the model lacks (an untrained MLM head), so reruns agree.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Continue prompts with a causal LM (GPT-2); prints one JSON line per
    /// prompt. Greedy unless --sample (or a --temperature, --top-k or --top-p).
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 30)]
        max_new_tokens: usize,
        /// Draw each token instead of taking the most likely one.
        #[arg(long)]
        sample: bool,
        #[arg(long)]
        temperature: Option<f64>,
        /// Draw among the k most likely tokens (0: all).
        #[arg(long)]
        top_k: Option<usize>,
        /// Draw among the most likely tokens whose probability reaches p.
        #[arg(long)]
        top_p: Option<f64>,
        /// Seed of the draws (and of any weights the model lacks).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum PrecisionArg {
    Fp32,
    Bf16,
    Fp16,
}

/// Standard output was closed by its reader (`mlm fill-mask ... | head -1`):
/// not an error, the command just stops.
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Prints one line of a command's result; a closed pipe becomes [`StdoutClosed`].
fn emit(line: impl std::fmt::Display) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(e).context("cannot write to standard output"),
    }
}

/// A command-line number within its range, or an error naming the flag.
fn in_range<T: PartialOrd + std::fmt::Display>(flag: &str, v: T, lo: T, hi: T) -> Result<T> {
    if v < lo || v > hi {
        bail!("{flag} {v} must be between {lo} and {hi}");
    }
    Ok(v)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Auto,
    Text,
    Jsonl,
    Parquet,
    Arrow,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl From<DeviceArg> for DeviceChoice {
    fn from(d: DeviceArg) -> Self {
        match d {
            DeviceArg::Auto => DeviceChoice::Auto,
            DeviceArg::Cpu => DeviceChoice::Cpu,
            DeviceArg::Cuda => DeviceChoice::Cuda,
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare { config, set } => {
            let cfg = Config::load(&config, &set)?;
            let tok = TextTokenizer::for_job(&cfg)?;
            // The store lives in the output directory by default: never write it
            // under a running job, nor for a start that `mlm train` would refuse.
            let out = &cfg.training.output_dir;
            let _lock =
                if cfg.prepared_dir().starts_with(out) { Some(crate::lock::lock_output_dir(out)?) } else { None };
            // The number of workers is `mlm train`'s to know: the global batch is checked there.
            let start = resume::plan(&cfg, None, Apply::Check)?;
            let p = prepare(&cfg, &tok, show_progress(cfg.logging.progress), start.data_key())?;
            emit(format_args!(
                "{}: {} train and {} test chunks{} of {} tokens",
                p.dir.display(),
                p.manifest.train_chunks,
                p.manifest.test_chunks,
                if p.manifest.eval.is_some() { " (data.eval_files)" } else { "" },
                p.manifest.block_size
            ))
        }
        Command::Train { config, mut set, resume } => {
            if let Some(r) = resume {
                set.push(format!("checkpoint.resume={}", toml::Value::String(r)));
            }
            let cfg = Config::load(&config, &set)?;
            let s = crate::train::run(cfg)?;
            if let Some((step, p)) = s.first_eval.filter(|_| s.start_step > 0) {
                emit(format_args!("perplexity at step {step} (the run's first evaluation): {p:.3}"))?;
            }
            match (s.before, s.start_step) {
                (Some(b), 0) => {
                    let fresh = if s.fresh_head { " (fresh MLM head)" } else { "" };
                    emit(format_args!("perplexity before: {:.3}{fresh}", b.perplexity))?;
                }
                (Some(b), step) => emit(format_args!("perplexity at step {step} (resumed): {:.3}", b.perplexity))?,
                (None, _) => {}
            }
            emit(format_args!("perplexity after:  {:.3} ({} steps)", s.after.perplexity, s.steps))?;
            emit(format_args!("last checkpoint:   {}", s.last.display()))?;
            if let Some(best) = s.best {
                emit(format_args!("best model:        {}", best.display()))?;
            }
            Ok(())
        }
        Command::Eval { model, data, block_size, batch_size, format, text_field, mlm_probability, seed, device } => {
            in_range("--block-size", block_size, 8, 1 << 20)?;
            in_range("--batch-size", batch_size, 1, 1 << 16)?;
            if !(mlm_probability > 0.0 && mlm_probability < 1.0) {
                bail!("--mlm-probability {mlm_probability} must be in (0, 1)");
            }
            if text_field.is_empty() {
                bail!("--text-field is empty: name the JSON field or Parquet column holding the text");
            }
            let model = crate::config::hub::resolve_model(&model, Path::new("."), None)?;
            let device = select_device(device.into(), "--device")?;
            let m = load_for_inference(&model, device, seed)?;
            let tok = TextTokenizer::load(&model.join("tokenizer.json"))?;
            check_vocab(&tok, &m)?;
            if block_size as i64 > m.max_positions() {
                bail!("--block-size {block_size} exceeds the model's {} positions", m.max_positions());
            }
            let dc = DataConfig {
                files: data,
                format: match format {
                    FormatArg::Auto => InputFormat::Auto,
                    FormatArg::Text => InputFormat::Text,
                    FormatArg::Jsonl => InputFormat::Jsonl,
                    FormatArg::Parquet => InputFormat::Parquet,
                    FormatArg::Arrow => InputFormat::Arrow,
                },
                text_field,
                document_boundary: DocumentBoundary::BlankLine,
                block_size,
                mlm_probability,
                ..DataConfig::default()
            };
            let tokens = tokenize_to_chunks(&dc, &tok)?;
            let store = TokenStore::from_tokens(tokens, block_size);
            let causal = m.arch.objective() == crate::model::Objective::Clm;
            let params = if causal { MaskingParams::causal(&dc, &tok) } else { MaskingParams::new(&dc, &tok)? };
            let batches = eval_batches(&store, &params, batch_size, 0, seed);
            let r = evaluate(&m, &batches, device, &crate::progress::Progress::hidden());
            if !r.perplexity.is_finite() {
                // JSON has no NaN or infinity: never a `null` with success.
                bail!(
                    "{}: the held-out perplexity is not finite (mean loss {} over {} predicted tokens): the model's \
                     outputs overflow on this data; use another checkpoint or model",
                    model.display(),
                    r.loss,
                    r.tokens
                );
            }
            if causal {
                return emit(serde_json::json!({
                    "perplexity": r.perplexity, "loss": r.loss, "predicted_tokens": r.tokens, "chunks": store.len(),
                    "definition": "exp(mean next-token cross-entropy over every position but each block's last)",
                }));
            }
            emit(serde_json::json!({
                "perplexity": r.perplexity, "loss": r.loss, "masked_tokens": r.tokens, "chunks": store.len(),
                "definition": "exp(mean cross-entropy over masked tokens), masks fixed by seed",
            }))
        }
        Command::BenchPeak { device, precision, size } => {
            in_range("--size", size, 64, 1 << 15)?;
            let device = select_device(device.into(), "--device")?;
            let (kind, name) = match precision {
                PrecisionArg::Fp32 => (tch::Kind::Float, "fp32"),
                PrecisionArg::Bf16 => (tch::Kind::BFloat16, "bf16"),
                PrecisionArg::Fp16 => (tch::Kind::Half, "fp16"),
            };
            crate::logging::set_activity(
                format!(" measuring the peak with two {size} x {size} {name} matrices (--size {size})"),
                format!("give bench-peak a smaller --size (e.g. {}), or free memory", (size / 2).max(64)),
            );
            let tflops = crate::train::observe::timing::measure_peak_tflops(
                device,
                kind,
                size,
                crate::train::observe::timing::PEAK_REPS,
            );
            emit(serde_json::json!({ "device": format!("{device:?}"), "precision": name, "peak_tflops": tflops }))
        }
        Command::Doctor => {
            for (k, v) in doctor::report() {
                emit(format!("{k:<22} {v}"))?;
            }
            Ok(())
        }
        Command::EstimateMemory(args) => estimate_memory::run(args),
        Command::FillMask { model, top_k, text, device, seed } => {
            in_range("--top-k", top_k, 1, 1 << 20)?;
            let model = crate::config::hub::resolve_model(&model, Path::new("."), None)?;
            let device = select_device(device.into(), "--device")?;
            let m = load_for_inference(&model, device, seed)?;
            let tok = TextTokenizer::load(&model.join("tokenizer.json"))
                .with_context(|| format!("{} has no usable tokenizer.json", model.display()))?;
            for t in &text {
                for p in fill_mask(&m, &tok, t, top_k)? {
                    emit(serde_json::to_string(&p)?)?;
                }
            }
            Ok(())
        }
        Command::Generate { model, prompt, max_new_tokens, sample, temperature, top_k, top_p, seed, device } => {
            in_range("--max-new-tokens", max_new_tokens, 1, 1 << 20)?;
            let sampling = (sample || temperature.is_some() || top_k.is_some() || top_p.is_some()).then(|| {
                // `generate(do_sample=True)`'s defaults: temperature 1, top-k 50, top-p 1.
                crate::infer::Sampling {
                    temperature: temperature.unwrap_or(1.0),
                    top_k: top_k.unwrap_or(50),
                    top_p: top_p.unwrap_or(1.0),
                    seed,
                }
            });
            if let Some(s) = &sampling {
                crate::infer::check_sampling(s)?;
            }
            let model = crate::config::hub::resolve_model(&model, Path::new("."), None)?;
            let device = select_device(device.into(), "--device")?;
            let m = load_for_inference(&model, device, seed)?;
            let tok = TextTokenizer::load(&model.join("tokenizer.json"))
                .with_context(|| format!("{} has no usable tokenizer.json", model.display()))?;
            check_vocab(&tok, &m)?;
            for p in &prompt {
                emit(serde_json::to_string(&crate::infer::generate(&m, &tok, p, max_new_tokens, sampling)?)?)?;
            }
            Ok(())
        }
    }
}
