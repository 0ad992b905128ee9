//! The `mlm` command line: `prepare`, `train`, `eval`, `fill-mask`.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, DataConfig, DeviceChoice, DocumentBoundary, InputFormat};
use crate::data::loader::eval_batches;
use crate::data::masking::MaskingParams;
use crate::data::prepare::{prepare, tokenize_to_chunks};
use crate::data::store::TokenStore;
use crate::data::tokenizer::TextTokenizer;
use crate::infer::fill_mask;
use crate::model::MaskedLm;
use crate::train::eval::evaluate;
use crate::train::metrics::show_progress;
use crate::train::{check_vocab, select_device};

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
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
    },
    /// Measure the peak matmul TFLOP/s of a device (for training.peak_tflops).
    BenchPeak {
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// fp32 or bf16.
        #[arg(long, default_value = "bf16")]
        precision: String,
        /// Side of the square matrices.
        #[arg(long, default_value_t = 4096)]
        size: i64,
    },
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
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    Auto,
    Text,
    Jsonl,
    Parquet,
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
            let tok = TextTokenizer::load(&cfg.tokenizer_path())?;
            let p = prepare(&cfg, &tok, show_progress(&cfg.logging.progress))?;
            println!(
                "{}: {} train and {} test chunks of {} tokens",
                p.dir.display(),
                p.manifest.train_chunks,
                p.manifest.test_chunks,
                p.manifest.block_size
            );
            Ok(())
        }
        Command::Train { config, mut set, resume } => {
            if let Some(r) = resume {
                set.push(format!("checkpoint.resume={}", toml::Value::String(r)));
            }
            let cfg = Config::load(&config, &set)?;
            let s = crate::train::run(cfg)?;
            if let Some(b) = s.before {
                println!("perplexity before: {:.3}", b.perplexity);
            }
            println!("perplexity after:  {:.3} ({} steps)", s.after.perplexity, s.steps);
            println!("last checkpoint:   {}", s.last.display());
            if let Some(best) = s.best {
                println!("best model:        {}", best.display());
            }
            Ok(())
        }
        Command::Eval { model, data, block_size, batch_size, format, text_field, mlm_probability, seed, device } => {
            let device = select_device(device.into())?;
            let (m, _) = MaskedLm::load_dir(&model, device)?;
            let tok = TextTokenizer::load(&model.join("tokenizer.json"))?;
            check_vocab(&tok, &m)?;
            if block_size as i64 > m.max_positions() {
                anyhow::bail!("--block-size {block_size} exceeds the model's {} positions", m.max_positions());
            }
            let dc = DataConfig {
                files: data,
                format: match format {
                    FormatArg::Auto => InputFormat::Auto,
                    FormatArg::Text => InputFormat::Text,
                    FormatArg::Jsonl => InputFormat::Jsonl,
                    FormatArg::Parquet => InputFormat::Parquet,
                },
                text_field,
                document_boundary: DocumentBoundary::BlankLine,
                block_size,
                mlm_probability,
                ..DataConfig::default()
            };
            let tokens = tokenize_to_chunks(&dc, &tok)?;
            let store = TokenStore::from_tokens(tokens, block_size);
            let params = MaskingParams::new(&dc, &tok);
            let batches = eval_batches(&store, &params, batch_size, 0, seed);
            let r = evaluate(&m, &batches, device);
            println!("{}", serde_json::json!({
                "perplexity": r.perplexity, "loss": r.loss, "masked_tokens": r.tokens, "chunks": store.len(),
                "definition": "exp(mean cross-entropy over masked tokens), masks fixed by seed",
            }));
            Ok(())
        }
        Command::BenchPeak { device, precision, size } => {
            let device = select_device(device.into())?;
            let kind = match precision.as_str() {
                "fp32" => tch::Kind::Float,
                "bf16" => tch::Kind::BFloat16,
                other => anyhow::bail!("--precision {other:?}: expected fp32 or bf16"),
            };
            let tflops = crate::train::timing::measure_peak_tflops(device, kind, size, 5);
            println!("{}", serde_json::json!({ "device": format!("{device:?}"), "precision": precision, "peak_tflops": tflops }));
            Ok(())
        }
        Command::FillMask { model, top_k, text, device } => {
            let device = select_device(device.into())?;
            let (m, _) = MaskedLm::load_dir(&model, device)?;
            let tok = TextTokenizer::load(&model.join("tokenizer.json"))
                .with_context(|| format!("{} has no usable tokenizer.json", model.display()))?;
            for t in &text {
                for p in fill_mask(&m, &tok, t, top_k)? {
                    println!("{}", serde_json::to_string(&p)?);
                }
            }
            Ok(())
        }
    }
}
