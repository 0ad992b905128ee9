//! The training job: prepared data in, checkpoints and metrics out.
//!
//! The loop in [`run`] reads like the recipe: next step's batches, forward and
//! backward, optimizer step, maybe log, maybe evaluate, maybe save. The details
//! live in [`Trainer`]'s methods and the modules beside this one.
mod compute;
pub mod eval;
pub mod host;
pub mod loss;
pub mod memory;
pub mod metrics;
mod micro;
pub mod nonfinite;
mod oom;
pub mod optimizer;
pub mod overlap;
pub mod plot;
pub mod recompute;
mod report;
pub mod resume;
pub mod schedule;
pub mod sync;
pub mod tensorboard;
pub mod timing;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, TrainerState};
use crate::config::{BatchShape, Config, Precision};
use crate::data::loader::{epoch_order, eval_batches, worker_chunks, Batch, BatchStream};
use crate::data::masking::MaskingParams;
use crate::data::prepare::{open_prepared, prepare};
use crate::data::store::Prepared;
use crate::data::tokenizer::TextTokenizer;
use crate::device::select_device;
use crate::infer::fill_mask;
use crate::lock::{lock_output_dir, Lock};
use crate::model::load::{check_vocab, load_model, Loaded};
use crate::model::MaskedLm;
use compute::compute_model;
use eval::{evaluate, EvalResult};
use loss::{masked_lm_loss_sum, DeviceBatch};
use metrics::{Metrics, Progress};
use nonfinite::NonFiniteGuard;
use optimizer::{AdamWParams, FlatAdamW};
use overlap::Overlap;
use resume::{Apply, StartPoint};
use schedule::LrSchedule;
use sync::GradSync;
use timing::{Phase, StepTimer};

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The evaluation at the start (`eval.at_start`): before training, or at
    /// the step a resumed run starts from.
    pub before: Option<EvalResult>,
    /// The step the run started from (0, or the resumed checkpoint's).
    pub start_step: usize,
    /// A resumed run's first evaluation (step, perplexity) from its metrics.
    pub first_eval: Option<(u64, f64)>,
    /// The model started with a fresh (random) MLM head.
    pub fresh_head: bool,
    pub after: EvalResult,
    pub best: Option<PathBuf>,
    pub last: PathBuf,
    pub steps: usize,
}

/// Runs a whole training job described by `cfg`.
pub fn run(cfg: Config) -> Result<Summary> {
    let mut t = Trainer::new(cfg)?;
    let before = t.evaluate_at_start()?;
    let progress = if t.sync.rank() == 0 {
        Progress::new(t.total_steps as u64, "train", &t.cfg.logging)
    } else {
        Progress::hidden()
    };
    progress.set(t.state.step as u64);
    while t.state.step < t.total_steps {
        let mut epoch = t.epoch_stream()?;
        while let Some(micro) = t.next_step(&mut epoch) {
            let loss = t.forward_backward(&micro)?;
            let loss = t.sync_gradients(loss)?;
            t.optimizer_step(&micro, loss)?;
            progress.set(t.state.step as u64);
            t.maybe_evaluate_and_save(Moment::AfterStep)?;
        }
        t.end_epoch()?;
    }
    progress.finish();
    let after = t.final_evaluation()?;
    t.probe_fill_mask("after training")?;
    t.log_improvement(before.as_ref(), &after);
    let last = checkpoint::list(&t.out).pop().map(|(_, p)| p).context("no checkpoint was written")?;
    let best = t.cfg.checkpoint.save_best.then(|| t.out.join("best"));
    Ok(Summary {
        before,
        start_step: t.start_step,
        first_eval: t.history.first_eval,
        fresh_head: t.fresh_head,
        after,
        best,
        last,
        steps: t.state.step,
    })
}

/// When the loop asks whether to evaluate or save.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// After an optimizer step.
    AfterStep,
    /// After the last step of an epoch.
    EpochEnd,
}

/// What is due at a [`Moment`] (the one home of the eval/save cadence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Nothing,
    /// Evaluate, save a checkpoint, and update `best/` when it improved.
    EvaluateAndSave,
    /// Save a checkpoint without evaluating.
    Save,
}

/// An evaluation and the step it was made at.
#[derive(Debug, Clone, Copy)]
struct Evaluated {
    result: EvalResult,
    step: usize,
}

/// Tokens and model FLOPs since the last logged step.
#[derive(Debug, Clone, Copy, Default)]
struct LogWindow {
    since_step: usize,
    tokens: u64,
    flops: f64,
}

/// Optimizer steps in an epoch of `train_chunks` chunks (the same for every
/// split of the global batch); an error when that is less than one step.
fn steps_per_epoch(train_chunks: usize, shape: &BatchShape) -> Result<usize> {
    let steps = crate::data::loader::steps_per_epoch(train_chunks, shape.global());
    if steps == 0 {
        bail!(
            "the training split has {train_chunks} chunks: fewer than one step ({shape}); lower \
             training.global_batch_size (or batch_size, grad_accum_steps) or give more data"
        );
    }
    Ok(steps)
}

/// Loads a checkpoint's weights into `master` (before the optimizer takes
/// them into its flat buffer).
fn load_weights(dir: &Path, master: &MaskedLm) -> Result<()> {
    let (file, tensors) = crate::model::weights::read_dir(dir)?;
    let report = crate::model::weights::load_into(&master.vs, master.arch, tensors, &file)?;
    if !report.missing.is_empty() {
        bail!("{}: checkpoint lacks {}", dir.display(), report.missing.join(", "));
    }
    Ok(())
}

/// Loads a checkpoint's optimizer state into `opt` and returns its trainer
/// state with this job's identity (`fresh`) kept.
fn restore(
    dir: &Path,
    saved: TrainerState,
    fresh: TrainerState,
    opt: &mut FlatAdamW,
    steps_per_epoch: usize,
) -> Result<TrainerState> {
    let moments = checkpoint::load_optimizer(dir, opt.numel())?;
    resume::check_position(dir, &saved, steps_per_epoch, moments.step)?;
    opt.restore(&moments.exp_avg, &moments.exp_avg_sq, moments.step);
    tracing::info!(
        "resuming from {} (step {}, epoch {}, step {} of the epoch)",
        dir.display(),
        saved.step,
        saved.position.epoch,
        saved.position.step_in_epoch
    );
    Ok(TrainerState {
        format_version: fresh.format_version,
        config_hash: fresh.config_hash,
        config: fresh.config,
        data_key: fresh.data_key,
        ..saved
    })
}

/// What identifies a job to its workers: the settings that shape it (as
/// written: the workers have not met yet, so the world size is not known) and
/// where it writes. Workers with different fingerprints never train together.
pub fn job_fingerprint(cfg: &Config) -> String {
    format!("{} {}", resume::job_hash(cfg), cfg.training.output_dir.display())
}

/// What rank 0 settles before training, for every worker: the start point and
/// the prepared data.
struct Claimed {
    /// The output directory's lock (rank 0 only), held for the whole job.
    _lock: Option<Lock>,
    start: StartPoint,
    data: Prepared,
}

/// How long the other workers wait for rank 0 to prepare the data.
const PREPARE_WAIT_S: u64 = 24 * 3600;

/// Rank 0 locks the output directory, cleans up after a crash, decides where
/// the job starts (refusing before anything is written) and prepares the data
/// while the others wait; then every worker opens the same start point and data.
fn claim_output_and_data(cfg: &Config, tok: &TextTokenizer, sync: &mut GradSync) -> Result<Claimed> {
    let out = &cfg.training.output_dir;
    let show = metrics::show_progress(cfg.logging.progress);
    if sync.rank() == 0 {
        let lock = lock_output_dir(out)?;
        checkpoint::recover(out)?;
        let start = resume::plan(cfg, Some(sync.world()), Apply::Apply)?;
        let data = prepare(cfg, tok, show, start.data_key())?;
        let chosen = start.checkpoint.as_ref().map(|(d, _)| d.to_string_lossy().into_owned()).unwrap_or_default();
        sync.broadcast_string(&chosen)?;
        return Ok(Claimed { _lock: Some(lock), start, data });
    }
    // Preparing a large corpus takes longer than distributed.timeout_s: wait
    // for it (a rank 0 that dies closes its connections or is reaped by the
    // launcher, so this does not hang on a crash).
    sync.set_timeout(Duration::from_secs(cfg.distributed.timeout_s.max(PREPARE_WAIT_S)));
    let chosen = sync.broadcast_string("");
    sync.set_timeout(Duration::from_secs(cfg.distributed.timeout_s.max(1)));
    let chosen = chosen?;
    let start = if chosen.is_empty() {
        StartPoint::default()
    } else {
        let dir = PathBuf::from(chosen);
        let state = resume::checked_state(&dir, cfg, Some(sync.world()))?;
        StartPoint { checkpoint: Some((dir, state)) }
    };
    let data = open_prepared(cfg, tok, start.data_key()).with_context(|| format!("rank {}", sync.rank()))?;
    Ok(Claimed { _lock: None, start, data })
}

struct Trainer {
    cfg: Config,
    /// The output directory's lock (rank 0), released when the job ends.
    _lock: Option<Lock>,
    /// The other workers (a single process talks to nobody).
    sync: GradSync,
    out: PathBuf,
    device: Device,
    tok: TextTokenizer,
    data: Prepared,
    masking: Arc<MaskingParams>,
    eval_set: Vec<Batch>,
    /// fp32 weights: its parameters are views of `opt.master`.
    master: MaskedLm,
    /// bf16 compute copy when `precision = "bf16"`.
    compute: Option<MaskedLm>,
    /// The trainable parameters of the model that runs, in the flat buffers' order.
    compute_tensors: Vec<Tensor>,
    /// How a step's global batch is split on this job's workers.
    shape: BatchShape,
    /// Sequences per forward pass (`training.micro_batch_size`, resolved).
    micro_rows: usize,
    opt: FlatAdamW,
    schedule: LrSchedule,
    metrics: Metrics,
    state: TrainerState,
    steps_per_epoch: usize,
    total_steps: usize,
    /// Skipped steps, counted on the device.
    nonfinite: NonFiniteGuard,
    /// The all-reduce overlapped with backward (several workers, `distributed.overlap`).
    overlap: Option<Overlap>,
    /// The step's gradient is already summed over the workers (by `overlap`).
    grads_summed: bool,
    /// This worker's masked tokens in the current step.
    step_masked: usize,
    /// What the logged MFU is measured against, TFLOP/s (0: not logged).
    peak_tflops: f64,
    started: Instant,
    window: LogWindow,
    timer: StepTimer,
    /// The latest evaluation, so that one step is never evaluated twice.
    last_eval: Option<Evaluated>,
    /// Resident memory before the model was built (libtorch, tokenizer), bytes.
    startup_rss: Option<u64>,
    /// The step this run started from (a resumed checkpoint's, else 0).
    start_step: usize,
    /// What the metrics file already held for a resumed run.
    history: metrics::History,
    /// The run started from a fresh (random) MLM head.
    fresh_head: bool,
}

impl Trainer {
    fn new(cfg: Config) -> Result<Self> {
        let t = &cfg.training;
        if t.threads > 0 {
            tch::set_num_threads(t.threads as i32);
        }
        // The CPU kernels (dropout masks, AdamW) take libtorch's thread count.
        mlm_kernels::start_threads(t.threads);
        let device = sync::worker_device(select_device(t.device, "training.device")?)?;
        if device.is_cuda() {
            crate::device::set_tf32(t.tf32)?;
            let how = if t.tf32 { "TF32 (training.tf32 = true)" } else { "full fp32 (training.tf32 = false)" };
            tracing::info!("fp32 matmuls on {device:?}: {how}");
        }
        let tok = TextTokenizer::load(&cfg.tokenizer_path())?;
        let startup_rss = metrics::resident_memory().map(|(now, _)| now);
        let Loaded { model: mut master, fresh_head } = load_model(&cfg, device)?;
        check_vocab(&tok, &master)?;
        if cfg.data.block_size as i64 > master.max_positions() {
            bail!(
                "data.block_size = {} exceeds the model's max_position_embeddings ({})",
                cfg.data.block_size,
                master.max_positions()
            );
        }
        let mut sync = GradSync::join(&cfg.distributed, device, &job_fingerprint(&cfg))?;
        let shape = t.batch_shape(sync.world())?;
        if sync.rank() == 0 {
            tracing::info!("{shape}");
        }
        let Claimed { _lock, start, data } = claim_output_and_data(&cfg, &tok, &mut sync)?;
        let masking = Arc::new(MaskingParams::new(&cfg.data, &tok));
        let eval_set = eval_batches(&data.test, &masking, cfg.eval.batch_size, cfg.eval.max_chunks, cfg.eval.mask_seed);
        for b in &eval_set {
            b.check_ids(master.vocab_size(), &data.dir)?;
        }
        let steps_per_epoch = steps_per_epoch(data.train.len(), &shape)?;
        let total_steps = if t.max_steps > 0 { t.max_steps } else { t.epochs * steps_per_epoch };
        let shaping = resume::shaping_config(&cfg, Some(shape.global()));
        let mut state = TrainerState {
            format_version: checkpoint::STATE_FORMAT,
            seed: t.seed,
            config_hash: resume::config_hash(&shaping),
            config: shaping,
            data_key: Some(data.manifest.inputs_key.clone()),
            ..Default::default()
        };
        if let Some((dir, _)) = &start.checkpoint {
            load_weights(dir, &master)?;
        }
        let params: Vec<(String, Tensor)> =
            master.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let mut opt = FlatAdamW::new(params, MaskedLm::no_decay, AdamWParams::from(t))?;
        if let Some((dir, saved)) = start.checkpoint {
            state = restore(&dir, saved, state, &mut opt, steps_per_epoch)?;
            if sync.rank() == 0 && cfg.checkpoint.save_best {
                resume::complete_best(&t.output_dir, &state)?;
            }
        }
        let (compute, compute_tensors) = compute_model(&mut master, &mut opt, t.precision)?;
        let model = compute.as_ref().unwrap_or(&master);
        let micro_rows =
            micro::rows_per_pass(&cfg, shape.batch_size, model, &compute_tensors, &data.train, &masking, device)?;
        let out = t.output_dir.clone();
        let start_step = state.step;
        let history = if sync.rank() == 0 && start_step > 0 {
            metrics::History::keep_until(&out.join(&cfg.logging.metrics_file), start_step as u64)?
        } else {
            metrics::History::default()
        };
        let metrics = if sync.rank() == 0 {
            let tb = cfg.logging.tensorboard.then(|| out.join("tb"));
            Metrics::open(&out.join(&cfg.logging.metrics_file), tb.as_deref())?
        } else {
            Metrics::disabled()
        };
        tracing::info!(
            "model: {} parameters on {:?} ({:?}); {} train / {} test chunks of {} tokens; {} steps of {} sequences",
            master.num_parameters(),
            device,
            t.precision,
            data.train.len(),
            data.test.len(),
            cfg.data.block_size,
            total_steps,
            shape.global()
        );
        if sync.rank() == 0 {
            tracing::info!("{}", model.attention_kernel_line(device, model.kind(), cfg.data.block_size as i64));
        }
        let kind = if cfg.training.precision == Precision::Bf16 { Kind::BFloat16 } else { Kind::Float };
        let (peak_tflops, peak_line) = timing::resolve_peak_tflops(cfg.training.peak_tflops, device, || {
            timing::measure_peak_tflops(device, kind, timing::PEAK_SIZE, timing::PEAK_REPS)
        });
        if let (Some(line), 0) = (peak_line, sync.rank()) {
            tracing::info!("{line}");
        }
        let overlap = (cfg.distributed.overlap && sync.world() > 1).then(|| Overlap::new(cfg.distributed.bucket_elems));
        if device == Device::Cpu {
            // From here on only the steps and evaluations allocate: their freed
            // tensors serve the next ones. Preparing the data, whose threads'
            // memory would stay in their own arenas, is behind us.
            tracing::info!("{}", crate::device::keep_freed_host_memory());
        }
        Ok(Self {
            _lock,
            sync,
            schedule: LrSchedule::new(t, total_steps),
            out,
            device,
            tok,
            data,
            masking,
            eval_set,
            master,
            compute,
            compute_tensors,
            shape,
            micro_rows,
            opt,
            metrics,
            window: LogWindow { since_step: state.step, ..Default::default() },
            start_step,
            history,
            fresh_head: (fresh_head && start_step == 0),
            last_eval: None,
            startup_rss,
            state,
            steps_per_epoch,
            total_steps,
            nonfinite: NonFiniteGuard::new(device, start_step),
            overlap,
            grads_summed: false,
            step_masked: 0,
            peak_tflops,
            started: Instant::now(),
            timer: StepTimer::new(device),
            cfg,
        })
    }

    fn model(&self) -> &MaskedLm {
        self.compute.as_ref().unwrap_or(&self.master)
    }

    /// This epoch's batches for this worker, from the current position.
    fn epoch_stream(&self) -> Result<BatchStream> {
        let at = self.state.position;
        let order = epoch_order(self.data.train.len(), self.cfg.training.seed, at.epoch as u64);
        BatchStream::new(
            self.data.train_arc(),
            self.masking.clone(),
            worker_chunks(&order, self.sync.rank(), self.sync.world()),
            self.shape.batch_size,
            at.start_batch(self.shape.grad_accum_steps),
            self.cfg.training.seed,
            at.epoch as u64,
            self.cfg.data.masker_threads,
            self.cfg.data.prefetch_batches,
        )
    }

    /// The next optimizer step's loader batches (`grad_accum_steps` of them), or
    /// `None` at the end of the epoch or of the run.
    fn next_step(&mut self, epoch: &mut BatchStream) -> Option<Vec<Batch>> {
        if self.state.step >= self.total_steps {
            return None;
        }
        self.timer.exact = self.device.is_cuda() && (self.state.step + 1).is_multiple_of(self.cfg.training.log_every);
        self.timer.start();
        // From here the step runs: the loader's threads (building this and the
        // next batches) and the passes; a failed allocation in either names it.
        oom::at_step(self.state.step + 1, &self.cfg, self.shape.batch_size, self.micro_rows);
        let accum = self.shape.grad_accum_steps;
        let micro: Vec<Batch> = epoch.by_ref().take(accum).collect();
        self.timer.end(Phase::Data);
        (micro.len() == accum).then_some(micro)
    }

    /// Forward and backward over one optimizer step's batches, each in passes of
    /// `micro_rows` sequences; the loss is normalised by the masked tokens of the
    /// whole step, so accumulation and micro-batches give the same gradient as
    /// one large batch. Returns the step's loss (0-d tensor). With several
    /// workers, loss and gradient are sums here, divided once summed over the
    /// workers ([`Self::sync_gradients`]): no collective before backward.
    fn forward_backward(&mut self, batches: &[Batch]) -> Result<Tensor> {
        self.step_masked = batches.iter().map(|b| b.n_masked).sum();
        let divisor = if self.sync.world() > 1 { 1.0 } else { self.step_masked.max(1) as f64 };
        let mut total = Tensor::zeros([], (Kind::Float, self.device));
        for b in batches {
            b.check_ids(self.master.vocab_size(), &self.data.dir)?;
        }
        let (rows, rank, world) = (self.micro_rows, self.sync.rank(), self.sync.world());
        let passes: Vec<_> = micro::step_passes(batches, rows, rank, world).collect();
        let last = passes.len().saturating_sub(1);
        for (pass, (first_row, b)) in passes.into_iter().enumerate() {
            // Dropout draws from libtorch's generator: one draw per pass
            // (`DropoutSeeds`, replayed by activation checkpointing).
            tch::manual_seed(micro::dropout_seed(self.cfg.training.seed, self.state.step, first_row));
            let db = DeviceBatch::new(&b, self.device);
            let sparse = self.cfg.training.sparse_head;
            let recompute = self.cfg.training.activation_checkpointing;
            let model = self.compute.as_ref().unwrap_or(&self.master);
            let params = &self.compute_tensors;
            if let (Some(overlap), true) = (self.overlap.as_mut(), pass == last) {
                // The step's last pass: staged backward, each stage's final
                // gradients summed over the workers while the stages below run.
                let loss = overlap.run(&mut self.sync, &mut self.opt, |sink| {
                    recompute::forward_backward(model, &db, divisor, sparse, params, recompute, |g| sink(g))
                })?;
                self.grads_summed = true;
                total += loss;
            } else if recompute {
                let opt = &mut self.opt;
                total +=
                    recompute::forward_backward(model, &db, divisor, sparse, params, true, |g| opt.accumulate_grads(g));
            } else {
                let loss = masked_lm_loss_sum(model, &db, true, sparse) / divisor;
                self.timer.end(Phase::Forward);
                // Gradients as outputs of the backward pass, not accumulated into
                // `.grad`: no per-parameter add or zeroing, straight into the flat buffer.
                let grads = Tensor::run_backward(&[&loss], params, false, false);
                self.opt.accumulate_grads(&grads);
                total += loss.detach();
            }
            self.timer.end(Phase::Backward);
        }
        Ok(total)
    }

    /// Sums the step's gradients, loss and masked tokens over the workers,
    /// and divides loss and gradient (the latter in the update) by the
    /// tokens: the gradient of one process with the summed batch. The loss and
    /// the tokens go in one all-reduce, on the device: nothing is read back.
    fn sync_gradients(&mut self, loss: Tensor) -> Result<Tensor> {
        if !std::mem::take(&mut self.grads_summed) {
            self.sync.sum_grads(&mut self.opt.grad)?;
        }
        if self.sync.world() == 1 {
            self.timer.end(Phase::Sync);
            return Ok(loss);
        }
        let mut sums = Tensor::stack(&[&loss, &loss.full_like(self.step_masked as f64)], 0);
        self.sync.comm.all_reduce_sum(&mut sums).context("summing the step's loss over the workers")?;
        let tokens = sums.get(1).clamp_min(1.0);
        self.opt.divide_grads_by(tokens.shallow_clone());
        self.timer.end(Phase::Sync);
        Ok(sums.get(0) / tokens)
    }

    /// Clipping, the non-finite policy, the AdamW update, the position, and
    /// the step's log line. A step that does not log reads nothing back from
    /// the device: a non-finite loss or gradient skips the update on the device,
    /// and the skips are counted and acted on at log steps ([`nonfinite`]).
    fn optimizer_step(&mut self, micro: &[Batch], loss: Tensor) -> Result<()> {
        let lr = self.schedule.lr(self.state.step);
        let grad_norm = self.nonfinite.step(&mut self.opt, &loss, lr, self.cfg.training.max_grad_norm)?;
        self.state.step += 1;
        self.state.position.advance();
        self.timer.end(Phase::Optimizer);
        self.timer.step_done();
        let tokens: u64 = micro.iter().map(|b| (b.rows * b.block_size) as u64).sum();
        let projected: usize =
            if self.cfg.training.sparse_head { micro.iter().map(|b| b.n_masked).sum() } else { tokens as usize };
        self.state.tokens_seen += tokens;
        self.window.tokens += tokens;
        self.window.flops +=
            timing::train_flops(&self.master, tokens as f64, projected as f64, self.cfg.data.block_size as f64);
        let step = self.state.step;
        if step.is_multiple_of(self.cfg.training.log_every) || step == self.total_steps {
            self.settle_nonfinite()?;
            self.log_step(loss, grad_norm, lr)?;
        }
        Ok(())
    }

    /// What the eval and checkpoint cadence asks for at `moment`.
    fn due(&self, moment: Moment) -> Due {
        let (step, total) = (self.state.step, self.total_steps);
        let every = |n: usize| n > 0 && step.is_multiple_of(n);
        let evaluated_here = self.last_eval.is_some_and(|e| e.step == step);
        // The last step is evaluated and saved by `final_evaluation`.
        if step >= total || evaluated_here {
            return Due::Nothing;
        }
        match moment {
            Moment::AfterStep if every(self.cfg.eval.every_steps) => Due::EvaluateAndSave,
            Moment::AfterStep if every(self.cfg.checkpoint.every_steps) => Due::Save,
            Moment::EpochEnd if self.cfg.eval.at_epoch_end => Due::EvaluateAndSave,
            _ => Due::Nothing,
        }
    }

    fn maybe_evaluate_and_save(&mut self, moment: Moment) -> Result<()> {
        match self.due(moment) {
            Due::Nothing => Ok(()),
            Due::Save => self.save(None),
            Due::EvaluateAndSave => self.evaluate_and_save().map(|_| ()),
        }
    }

    /// Moves the position to the next epoch (when the run goes on, or when this
    /// epoch has no full step left), then the epoch-end evaluation.
    fn end_epoch(&mut self) -> Result<()> {
        if self.state.step < self.total_steps || self.state.position.epoch_done(self.steps_per_epoch) {
            self.state.position.next_epoch();
        }
        self.maybe_evaluate_and_save(Moment::EpochEnd)
    }

    /// The evaluation after the last step (reused when the last step was just
    /// evaluated), with its checkpoint.
    fn final_evaluation(&mut self) -> Result<EvalResult> {
        match self.last_eval {
            Some(e) if e.step == self.state.step => Ok(e.result),
            _ => self.evaluate_and_save(),
        }
    }

    /// Evaluates, saves a checkpoint, and updates `best/` when it improved.
    fn evaluate_and_save(&mut self) -> Result<EvalResult> {
        let r = self.evaluate()?;
        tracing::info!("step {} held-out perplexity {:.3} (loss {:.4})", self.state.step, r.perplexity, r.loss);
        self.save(Some(r))?;
        self.last_eval = Some(Evaluated { result: r, step: self.state.step });
        Ok(r)
    }

    fn save(&mut self, eval: Option<EvalResult>) -> Result<()> {
        let improved = eval.is_some_and(|r| self.state.best_perplexity.is_none_or(|b| r.perplexity < b));
        if improved {
            self.state.best_perplexity = eval.map(|r| r.perplexity);
            self.state.best_step = Some(self.state.step);
        }
        self.settle_nonfinite()?;
        if host::read_f64(&self.opt.master.isfinite().all()) == 0.0 {
            bail!("the weights hold NaN or infinity at step {}: not saved", self.state.step);
        }
        if self.sync.rank() != 0 {
            return self.sync.barrier();
        }
        oom::saving(self.state.step);
        let moments = checkpoint::OptimizerState {
            exp_avg: self.opt.exp_avg.shallow_clone(),
            exp_avg_sq: self.opt.exp_avg_sq.shallow_clone(),
            step: self.opt.steps(),
        };
        let dir = checkpoint::save(&self.out, &self.master, &self.tok.json, &moments, &self.state)?;
        if improved && self.cfg.checkpoint.save_best {
            checkpoint::update_best(&self.out, &dir)?;
            tracing::info!(
                "new best perplexity {:.3}: {}",
                self.state.best_perplexity.unwrap(),
                self.out.join("best").display()
            );
        }
        checkpoint::prune(&self.out, self.cfg.checkpoint.keep_last, self.state.step)?;
        tracing::info!("saved {}", dir.display());
        self.sync.barrier()
    }

    /// Brings `state.nonfinite_skipped` up to date from the device counters, and
    /// stops the job after `training.max_nonfinite_steps` skipped in a row.
    fn settle_nonfinite(&mut self) -> Result<()> {
        let limit = self.cfg.training.max_nonfinite_steps;
        self.nonfinite.settle(self.state.step, &mut self.state.nonfinite_skipped, limit)
    }
}
