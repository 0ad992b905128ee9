//! `mlm estimate-memory CONFIG`: what the job will hold in memory, before it is
//! launched: the training state, the activations of each micro-batch size with
//! and without activation checkpointing, the largest micro-batch size that fits
//! the device, and a verdict. The model is read from its `config.json` only;
//! nothing is allocated. The estimate itself is `src/train/memory.rs`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::emit;
use crate::config::{Config, DeviceChoice, MicroBatchSize};
use crate::device::CudaProbe;
use crate::model::shape::ModelShape;
use crate::train::memory::{Estimate, Fit, Job, Largest, Margins, OtherPeaks, States, Target, GIB};

/// The command line of `mlm estimate-memory`.
#[derive(clap::Args, Debug)]
pub struct Args {
    config: PathBuf,
    /// Override a config key: section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Memory of one GPU in GiB, e.g. 80 (default: the first visible GPU's, or
    /// without a GPU the memory available on this machine). Implies a CUDA job
    /// unless training.device = "cpu".
    #[arg(long, value_name = "GiB", allow_hyphen_values = true)]
    gpu_memory: Option<String>,
    /// The model's config.json, when the folder [model] names is not on this
    /// machine (a path on the cluster, a hub name).
    #[arg(long, value_name = "PATH")]
    model_config: Option<PathBuf>,
    /// Workers the job runs on: with training.global_batch_size, each worker's
    /// batch is the global batch divided among them.
    #[arg(long, value_name = "N", default_value_t = 1)]
    workers: usize,
    /// One JSON object instead of the table (bytes, not GiB).
    #[arg(long)]
    json: bool,
}

/// Everything the command prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub model_config: PathBuf,
    pub arch: &'static str,
    pub parameters: u64,
    pub target: Target,
    /// Where `memory_bytes` came from.
    pub memory_source: String,
    pub memory_bytes: u64,
    pub margins: Margins,
    pub states: States,
    pub other_peaks: OtherPeaks,
    /// The sizes that matter: 1, the powers of two from 8 that divide the
    /// batch, the batch, the configured size; each without and with
    /// activation checkpointing.
    pub passes: Vec<Fit>,
    /// The job as configured (`"auto"` resolved as the search would resolve it).
    pub configured: Fit,
    pub largest_fitting: Largest,
    pub verdict: String,
}

pub fn run(args: Args) -> Result<()> {
    let gpu_memory = args.gpu_memory.as_deref().map(parse_gib).transpose()?;
    let cfg = Config::load(&args.config, &args.set)?;
    let path = model_config_path(&cfg, args.model_config.as_deref())?;
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the model's config.json at {}: pass --model-config path/to/config.json when the model \
             folder is not on this machine",
            path.display()
        )
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let shape = ModelShape::from_config(&json).with_context(|| format!("{}", path.display()))?;
    let target = target(&cfg, gpu_memory.is_some())?;
    let (memory, source) = memory(target, gpu_memory)?;
    if args.workers == 0 {
        bail!("--workers 0: a job has at least one worker");
    }
    let batch = cfg.training.batch_shape(args.workers)?.batch_size;
    let objective = cfg.training.objective.unwrap_or(crate::model::Arch::from_config(&json)?.objective());
    let job = Job::from_config(&cfg, batch, target, objective);
    let r = report(&Estimate::new(&shape, &job), memory, source, path);
    if args.json {
        return emit(serde_json::to_string(&r)?);
    }
    for line in text_lines(&r, &shape, &job) {
        emit(line)?;
    }
    Ok(())
}

/// `--gpu-memory`: a positive number of GiB, below a million. Each refusal
/// says which of the two the value (as written) breaks.
fn parse_gib(s: &str) -> Result<u64> {
    match s.trim().parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 && g < MAX_GPU_GIB => Ok((g * GIB) as u64),
        Ok(g) if g >= MAX_GPU_GIB => {
            bail!(
                "--gpu-memory {s} GiB is more than any GPU has: give one GPU's memory in GiB, below 1000000 (e.g. 80)"
            )
        }
        _ => bail!("--gpu-memory {s:?} must be a positive number of GiB (e.g. 80)"),
    }
}

/// More GiB than `--gpu-memory` accepts (no GPU comes near it).
const MAX_GPU_GIB: f64 = 1e6;

/// `--model-config`, else `[model] config`, else `<[model] path>/config.json`.
fn model_config_path(cfg: &Config, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    match (&cfg.model.config, &cfg.model.path) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(dir)) => Ok(dir.join("config.json")),
        (None, None) => bail!("[model] names no model: set model.path or model.config, or pass --model-config"),
    }
}

/// CUDA when the job asks for it, or may take a GPU (`auto`) and one is visible
/// or `--gpu-memory` names one.
fn target(cfg: &Config, gpu_memory: bool) -> Result<Target> {
    Ok(match cfg.training.device {
        DeviceChoice::Cpu if gpu_memory => bail!(
            "--gpu-memory is for GPU jobs but training.device = \"cpu\": leave it out (the CPU's available memory \
             is used) or --set training.device=cuda"
        ),
        DeviceChoice::Cpu => Target::Cpu,
        DeviceChoice::Cuda => Target::Cuda,
        DeviceChoice::Auto if gpu_memory || !CudaProbe::get().devices.is_empty() => Target::Cuda,
        DeviceChoice::Auto => Target::Cpu,
    })
}

/// The memory to fit in, and where it came from.
fn memory(target: Target, gpu_memory: Option<u64>) -> Result<(u64, String)> {
    if let Some(bytes) = gpu_memory {
        return Ok((bytes, "--gpu-memory".into()));
    }
    match target {
        Target::Cuda => match CudaProbe::get().devices.first() {
            Some((name, bytes)) => Ok((*bytes as u64, format!("GPU 0, {name}"))),
            None => bail!("training.device = \"cuda\" but no GPU is visible here: pass --gpu-memory GiB (e.g. 80)"),
        },
        Target::Cpu => match crate::model::available_memory() {
            Some(bytes) => Ok((bytes, "MemAvailable of this machine".into())),
            None => bail!("cannot read MemAvailable from /proc/meminfo: pass --gpu-memory GiB"),
        },
    }
}

fn report(e: &Estimate, memory: u64, memory_source: String, model_config: PathBuf) -> Report {
    let job = e.job;
    let batch = job.batch;
    let ckpt = job.activation_checkpointing;
    let largest = Largest {
        without_checkpointing: e.largest_fitting(false, memory),
        with_checkpointing: e.largest_fitting(true, memory),
    };
    let rows = match job.micro_batch_size {
        MicroBatchSize::Whole => batch,
        MicroBatchSize::Rows(n) => n as u64,
        MicroBatchSize::Auto if job.target == Target::Cpu => batch,
        MicroBatchSize::Auto => {
            (if ckpt { largest.with_checkpointing } else { largest.without_checkpointing }).unwrap_or(1)
        }
    };
    let mut sizes: Vec<u64> = std::iter::once(1).chain((3..40).map(|k| 1u64 << k).take_while(|&r| r < batch)).collect();
    sizes.retain(|r| batch.is_multiple_of(*r));
    sizes.extend([batch, rows]);
    sizes.sort_unstable();
    sizes.dedup();
    let configured = e.fit(rows, ckpt, memory);
    Report {
        model_config,
        arch: e.model.model_type,
        parameters: e.model.parameters,
        target: job.target,
        memory_source,
        memory_bytes: memory,
        margins: Margins::for_target(job.target),
        states: e.states(),
        other_peaks: e.other_peaks(),
        passes: sizes.iter().flat_map(|&r| [e.fit(r, false, memory), e.fit(r, true, memory)]).collect(),
        verdict: verdict(e, &configured, largest, memory),
        configured,
        largest_fitting: largest,
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// One line: whether the configured job fits, and what would.
fn verdict(e: &Estimate, configured: &Fit, largest: Largest, memory: u64) -> String {
    let job = e.job;
    let ckpt = job.activation_checkpointing;
    let setting = match job.micro_batch_size {
        MicroBatchSize::Auto if job.target == Target::Cuda => {
            format!("micro_batch_size = \"auto\" (picks {})", configured.pass.rows)
        }
        MicroBatchSize::Auto => format!("micro_batch_size = \"auto\" ({}, the whole batch on the CPU)", job.batch),
        MicroBatchSize::Whole => format!("micro_batch_size = {} (the whole batch)", job.batch),
        MicroBatchSize::Rows(n) => format!("micro_batch_size = {n}"),
    };
    let with = if ckpt { "with" } else { "without" };
    let what =
        format!("{setting} {with} activation checkpointing needs {} of {}", gib(configured.needed_bytes), gib(memory));
    if configured.fits {
        let more = match (ckpt, largest.with_checkpointing) {
            (false, Some(r)) if r > configured.pass.rows => {
                format!("; activation_checkpointing = true would fit micro_batch_size = {r}")
            }
            _ => String::new(),
        };
        return format!("fits: {what}{more}");
    }
    let margins = Margins::for_target(job.target);
    let evaluation = margins.needed(e.other_peaks().evaluation_bytes);
    if evaluation > memory {
        return format!(
            "does not fit: {what}; evaluating eval.batch_size = {} sequences alone needs {}: lower eval.batch_size",
            job.eval_batch,
            gib(evaluation)
        );
    }
    let own = if ckpt { largest.with_checkpointing } else { largest.without_checkpointing };
    let mut advice: Vec<String> = own.iter().map(|r| format!("micro_batch_size = {r}")).collect();
    if let (false, Some(r)) = (ckpt, largest.with_checkpointing) {
        if own.is_none_or(|o| r > o) {
            advice.push(format!("activation_checkpointing = true with micro_batch_size = {r}"));
        }
    }
    if advice.is_empty() {
        return format!(
            "does not fit: {what}; not even one sequence fits: use a smaller model or data.block_size, or a device \
             with more memory"
        );
    }
    format!("does not fit: {what}; set training.{}", advice.join(", or training."))
}

/// The human-readable report.
fn text_lines(r: &Report, m: &ModelShape, job: &Job) -> Vec<String> {
    let g = |b: u64| format!("{:.2}", b as f64 / GIB);
    let relative = m.relative.map(|x| format!(", relative span {}", x.span)).unwrap_or_default();
    let micro = match job.micro_batch_size {
        MicroBatchSize::Whole => "whole batch".to_string(),
        MicroBatchSize::Auto => "\"auto\"".to_string(),
        MicroBatchSize::Rows(n) => n.to_string(),
    };
    let device = match r.target {
        Target::Cpu => "CPU",
        Target::Cuda => "CUDA",
    };
    let reserved = match r.target {
        Target::Cpu => "the process: libtorch, tokenizer, data",
        Target::Cuda => "CUDA context and workspaces",
    };
    let mut out = vec![
        format!(
            "model    {}: {} ({:.1}M parameters; hidden {}, {} layers, {} heads, intermediate {}, vocab {}{relative})",
            r.arch,
            r.model_config.display(),
            r.parameters as f64 / 1e6,
            m.hidden,
            m.layers,
            m.heads,
            m.intermediate,
            m.vocab
        ),
        format!(
            "job      {:?} on {device}: batch {} x {} tokens, micro_batch_size {micro}, activation checkpointing {}, \
             {} head, {}",
            job.precision,
            job.batch,
            job.block,
            if job.activation_checkpointing { "on" } else { "off" },
            if job.sparse_head { "sparse" } else { "dense" },
            if job.causal {
                "causal (every next token predicted)".to_string()
            } else {
                format!("mlm_probability {}", job.mlm_probability)
            }
        )
        .replace("Fp32", "fp32")
        .replace("Bf16", "bf16")
        .replace("Fp16", "fp16"),
        format!(
            "memory   {} ({}); margins: {} reserved ({reserved}) and {:.0}% of the peak for fragmentation",
            gib(r.memory_bytes),
            r.memory_source,
            gib(r.margins.reserved_bytes),
            100.0 * r.margins.fragmentation
        ),
        String::new(),
        "training state                   GiB".into(),
    ];
    let s = &r.states;
    for (name, b) in [
        ("fp32 master weights", s.weights_bytes),
        ("bf16/fp16 compute copy", s.compute_weights_bytes),
        ("fp32 gradients", s.gradients_bytes),
        ("AdamW moments (2 x fp32)", s.optimizer_bytes),
        ("total", s.total()),
    ] {
        if b > 0 || name == "total" {
            out.push(format!("  {name:<28} {:>6}", g(b)));
        }
    }
    out.push(String::new());
    out.push(format!(
        "per forward/backward pass of `rows` sequences of {} tokens, GiB (needed = the job's peak + margins)",
        job.block
    ));
    out.push(format!("{:>6}  {:^36}  {:^36}", "", "without activation checkpointing", "with activation checkpointing"));
    let cols = format!("{:>11} {:>7} {:>7} {:>5}", "activations", "peak", "needed", "fits");
    out.push(format!("{:>6}  {cols}     {cols}", "rows"));
    for pair in r.passes.chunks(2) {
        let cell = |f: &Fit| {
            format!(
                "{:>11} {:>7} {:>7} {:>5}",
                g(f.pass.activations_bytes),
                g(f.pass.peak_bytes),
                g(f.needed_bytes),
                if f.fits { "yes" } else { "no" }
            )
        };
        out.push(format!("{:>6}  {}     {}", pair[0].pass.rows, cell(&pair[0]), cell(&pair[1])));
    }
    let o = &r.other_peaks;
    out.push(format!(
        "peak of the configured pass: {} at the {}",
        gib(r.configured.pass.peak_bytes),
        r.configured.pass.peak_at
    ));
    out.push(format!(
        "other peaks: AdamW step {}, evaluation of {} sequences {}{}",
        gib(o.optimizer_step_bytes),
        job.eval_batch,
        gib(o.evaluation_bytes),
        if o.startup_bytes > s.total() {
            format!(", building the bf16/fp16 copy at start {}", gib(o.startup_bytes))
        } else {
            String::new()
        }
    ));
    let l = &r.largest_fitting;
    let n = |x: Option<u64>| x.map_or("none".to_string(), |r| r.to_string());
    out.push(format!(
        "largest micro_batch_size that fits: {} without activation checkpointing, {} with",
        n(l.without_checkpointing),
        n(l.with_checkpointing)
    ));
    out.push(format!("verdict: {}", r.verdict));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_memory_refusals_name_the_rule_the_value_breaks() {
        assert_eq!(parse_gib("80").unwrap(), 80 * 1024 * 1024 * 1024);
        // A huge value is positive: refused for its size, written as given.
        let e = parse_gib("1e6").unwrap_err().to_string();
        assert!(e.contains("--gpu-memory 1e6 GiB is more than any GPU has") && !e.contains("positive"), "{e}");
        let e = parse_gib("-3").unwrap_err().to_string();
        assert!(e.contains("must be a positive number of GiB"), "{e}");
    }
}
