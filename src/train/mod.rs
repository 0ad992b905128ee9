//! The training job: prepared data in, checkpoints and metrics out.
//!
//! The loop in [`run`] reads like the recipe: next step's batches, forward and
//! backward, optimizer step, maybe log, maybe evaluate, maybe save. The details
//! live in [`Trainer`]'s methods and the modules beside this one.
pub mod ddp;
pub mod eval;
pub mod flat;
pub mod loss;
pub mod memory;
mod micro;
pub mod observe;
pub mod optim;
pub mod preempt;
pub mod recompute;
pub mod resume;
mod trainer;

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
use crate::infer::{fill_mask, generate};
use crate::lock::{lock_output_dir, Lock};
use crate::model::load::{check_vocab, load_model, Loaded};
use crate::model::{MaskedLm, Objective};
use crate::progress::{show_progress, Progress};
use ddp::overlap::Overlap;
use ddp::GradSync;
use eval::{evaluate, EvalResult};
use flat::FlatParams;
use loss::{masked_lm_loss_sum, DeviceBatch};
use observe::metrics::{self, Metrics};
use observe::tensorboard::EventWriter;
use observe::{oom, timing};
use optim::host;
use optim::loss_scale::LossScaler;
use optim::nonfinite::{NonFiniteGuard, Stepped};
use optim::schedule::LrSchedule;
use optim::{AdamW, AdamWParams};
use preempt::{Asks, Preempted, Watch};
use resume::{Apply, StartPoint};
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
    t.watch.arm()?;
    while t.state.step < t.total_steps {
        let mut epoch = t.epoch_stream()?;
        while let Some(micro) = t.next_step(&mut epoch) {
            let passes = t.forward_backward(&micro)?;
            let synced = t.sync_gradients(passes)?;
            t.optimizer_step(&micro, synced)?;
            progress.set(t.state.step as u64);
            t.maybe_evaluate_and_save(Moment::AfterStep)?;
        }
        t.end_epoch()?;
    }
    progress.finish();
    let after = t.final_evaluation()?;
    t.probe("after training")?;
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
    /// Save a checkpoint and stop: the workers agreed on it after a signal
    /// ([`preempt`]).
    SaveAndStop,
}

/// What forward and backward of one step leave for the gradient sum.
struct Backward {
    /// The step's loss (0-d); a sum of per-token losses with several workers.
    loss: Tensor,
    /// This worker's masked tokens in the step.
    masked: usize,
    /// The gradient is already summed over the workers (overlapped with backward).
    summed: bool,
}

/// A step's gradient summed over the workers, ready for the update.
struct Synced {
    /// The step's mean loss over every worker's masked tokens (0-d).
    loss: Tensor,
    /// Several workers: what they asked for at this step, summed ([`preempt`]).
    asks: Option<Tensor>,
    /// What the summed gradient is still to be divided by (several workers:
    /// the masked tokens of all of them), applied by the update.
    divisor: Option<Tensor>,
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

/// What identifies a job to its workers: the settings that shape it (as
/// written: the workers have not met yet, so the world size is not known) and
/// where it writes. Workers with different fingerprints never train together.
pub fn job_fingerprint(cfg: &Config) -> String {
    format!("{} {}", resume::job_hash(cfg), cfg.training.output_dir.display())
}

struct Trainer {
    cfg: Config,
    /// The output directory's lock (rank 0), released when the job ends.
    lock: Option<Lock>,
    /// The other workers (a single process talks to nobody).
    sync: GradSync,
    out: PathBuf,
    device: Device,
    tok: TextTokenizer,
    data: Prepared,
    masking: Arc<MaskingParams>,
    eval_set: Vec<Batch>,
    /// fp32 weights: its parameters are views of `params`' master buffer.
    master: MaskedLm,
    /// bf16/fp16 compute copy when `precision = "bf16"` or `"fp16"`.
    compute: Option<MaskedLm>,
    /// The trainable parameters of the model that runs, in the flat buffers' order.
    compute_tensors: Vec<Tensor>,
    /// How a step's global batch is split on this job's workers.
    shape: BatchShape,
    /// Sequences per forward pass (`training.micro_batch_size`, resolved).
    micro_rows: usize,
    params: FlatParams,
    adamw: AdamW,
    schedule: LrSchedule,
    metrics: Metrics,
    state: TrainerState,
    steps_per_epoch: usize,
    total_steps: usize,
    /// Skipped steps, counted on the device.
    nonfinite: NonFiniteGuard,
    /// The dynamic loss scale (`precision = "fp16"`).
    scaler: Option<LossScaler>,
    /// fp16: the skipped steps so far, by which the schedule lags the step (the
    /// Hugging Face Trainer steps its scheduler only when the optimizer ran),
    /// and the latest step's skip flag, not yet added (read at the next step).
    schedule_lag: usize,
    pending_skip: Option<Tensor>,
    /// The all-reduce overlapped with backward (several workers, `distributed.overlap`).
    overlap: Option<Overlap>,
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
    /// The save signals and rank 0's save clock ([`preempt`]).
    watch: Watch,
    /// What the workers asked for at the last step, summed (several workers).
    asks: Option<Tensor>,
}

impl Trainer {
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
            // A causal LM's labels are a copy of its blocks: one thread reads ahead.
            if self.masking.causal { 1 } else { self.cfg.data.masker_threads },
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
    fn forward_backward(&mut self, batches: &[Batch]) -> Result<Backward> {
        let masked: usize = batches.iter().map(|b| b.n_masked).sum();
        let divisor = if self.sync.world() > 1 { 1.0 } else { masked.max(1) as f64 };
        let mut summed = false;
        let mut total = Tensor::zeros([], (Kind::Float, self.device));
        for b in batches {
            b.check_ids(self.master.vocab_size(), &self.data.dir)?;
        }
        let (rows, rank, world) = (self.micro_rows, self.sync.rank(), self.sync.world());
        // fp16: the gradients are the scaled loss's (unscaled in the update).
        // Several workers back-propagate their loss sum over their own masked
        // tokens, so that its fp16 gradients are those of a mean (a sum's would
        // overflow at a scale that many times smaller); the flat buffer
        // multiplies them back ([`FlatParams::set_grad_factor`]).
        let (scale, factor) = match &self.scaler {
            Some(s) if world > 1 => (Some(s.scale() / masked.max(1) as f64), masked.max(1) as f64),
            Some(s) => (Some(s.scale().shallow_clone()), 1.0),
            None => (None, 1.0),
        };
        self.params.set_grad_factor(factor);
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
            let scale = scale.as_ref();
            if let (Some(overlap), true) = (self.overlap.as_mut(), pass == last) {
                // The step's last pass: staged backward, each stage's final
                // gradients summed over the workers while the stages below run.
                let loss = overlap.run(&mut self.sync, &mut self.params, |sink| {
                    recompute::forward_backward(model, &db, divisor, scale, sparse, params, recompute, |g| sink(g))
                })?;
                summed = true;
                total += loss;
            } else if recompute || !loss::head_fits_at_once(model, &db, sparse) {
                // Activation checkpointing, or a head too large to run whole
                // (a causal LM): the staged backward, its head in chunks.
                let flat = &mut self.params;
                total += recompute::forward_backward(model, &db, divisor, scale, sparse, params, recompute, |g| {
                    flat.accumulate(g)
                });
            } else {
                let loss = masked_lm_loss_sum(model, &db, true, sparse) / divisor;
                self.timer.end(Phase::Forward);
                let scaled = scale.map(|s| &loss * s);
                // Gradients as outputs of the backward pass, not accumulated into
                // `.grad`: no per-parameter add or zeroing, straight into the flat buffer.
                let grads = Tensor::run_backward(&[scaled.as_ref().unwrap_or(&loss)], params, false, false);
                self.params.accumulate(&grads);
                total += loss.detach();
            }
            self.timer.end(Phase::Backward);
        }
        Ok(Backward { loss: total, masked, summed })
    }

    /// Sums the step's gradients, loss and masked tokens over the workers,
    /// and divides loss and gradient (the latter in the update) by the
    /// tokens: the gradient of one process with the summed batch. The loss and
    /// the tokens go in one all-reduce, on the device: nothing is read back.
    fn sync_gradients(&mut self, step: Backward) -> Result<Synced> {
        if !step.summed {
            self.sync.sum_grads(&mut self.params)?;
        }
        if self.sync.world() == 1 {
            self.timer.end(Phase::Sync);
            return Ok(Synced { loss: step.loss, divisor: None, asks: None });
        }
        // What the workers ask for travels with the loss: no collective of its own.
        let [stop, save] = self.watch.asks(Instant::now()).values();
        let (masked, stop, save) =
            (step.loss.full_like(step.masked as f64), step.loss.full_like(stop), step.loss.full_like(save));
        let mut sums = Tensor::stack(&[&step.loss, &masked, &stop, &save], 0);
        self.sync.comm.all_reduce_sum(&mut sums).context("summing the step's loss over the workers")?;
        let tokens = sums.get(1).clamp_min(1.0);
        self.timer.end(Phase::Sync);
        Ok(Synced { loss: sums.get(0) / &tokens, divisor: Some(tokens), asks: Some(sums.narrow(0, 2, 2)) })
    }

    /// Clipping, the non-finite policy, the AdamW update, the position, and
    /// the step's log line. A step that does not log reads nothing back from
    /// the device: a non-finite loss or gradient skips the update on the device,
    /// and the skips are counted and acted on at log steps ([`nonfinite`]).
    fn optimizer_step(&mut self, micro: &[Batch], step: Synced) -> Result<()> {
        if let Some(skip) = self.pending_skip.take() {
            // The previous step's flag: its kernels ran while this step's
            // forward and backward were queued, so the device is not drained.
            self.schedule_lag += host::read_f64(&skip) as usize;
        }
        let lr = self.schedule.lr(self.state.step - self.schedule_lag);
        let Synced { loss, divisor, asks } = step;
        self.asks = asks;
        let max_norm = self.cfg.training.max_grad_norm;
        let (params, adamw, scaler) = (&mut self.params, &mut self.adamw, self.scaler.as_mut());
        let Stepped { grad_norm, skip } =
            self.nonfinite.step(params, adamw, divisor.as_ref(), &loss, lr, max_norm, scaler)?;
        if self.scaler.is_some() {
            self.pending_skip = Some(skip);
        }
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

    /// What the eval and checkpoint cadence asks for at `moment`, given what
    /// the workers agreed on at this step ([`Self::agreed`]).
    fn due(&self, moment: Moment, asks: Asks) -> Due {
        let (step, total) = (self.state.step, self.total_steps);
        let every = |n: usize| n > 0 && step.is_multiple_of(n);
        let evaluated_here = self.last_eval.is_some_and(|e| e.step == step);
        // The last step is evaluated and saved by `final_evaluation`.
        if step >= total || evaluated_here {
            return Due::Nothing;
        }
        // A stop evaluates nothing: the time left is the save's (a resumed
        // run evaluates this step with `eval.at_start`).
        if asks.stop {
            return Due::SaveAndStop;
        }
        match moment {
            Moment::AfterStep if every(self.cfg.eval.every_steps) => Due::EvaluateAndSave,
            Moment::AfterStep if every(self.cfg.checkpoint.every_steps) || asks.save => Due::Save,
            Moment::EpochEnd if self.cfg.eval.at_epoch_end => Due::EvaluateAndSave,
            _ => Due::Nothing,
        }
    }

    fn maybe_evaluate_and_save(&mut self, moment: Moment) -> Result<()> {
        let asks = if moment == Moment::AfterStep { self.agreed()? } else { Asks::default() };
        match self.due(moment, asks) {
            Due::Nothing => Ok(()),
            Due::Save => self.save(None),
            Due::EvaluateAndSave => self.evaluate_and_save().map(|_| ()),
            Due::SaveAndStop => {
                let signal = self.watch.signal();
                if self.sync.rank() == 0 {
                    let why = signal.unwrap_or("another worker's signal");
                    tracing::warn!("{why}: saving step {} and stopping", self.state.step);
                }
                self.save(None)?;
                Err(Preempted { step: self.state.step, signal }.into())
            }
        }
    }

    /// What the workers agree on at this step boundary: this worker's own
    /// asks when it is alone, else the sums of all workers' asks at this step
    /// ([`preempt`]),
    /// read every step on the CPU and at log steps on a GPU (the same steps on
    /// every worker).
    fn agreed(&mut self) -> Result<Asks> {
        if self.sync.world() == 1 {
            return Ok(self.watch.asks(Instant::now()));
        }
        let Some(sums) = self.asks.take() else { return Ok(Asks::default()) };
        let step = self.state.step;
        let values = if self.device == Device::Cpu {
            vec![host::cpu_value(&sums.get(0)), host::cpu_value(&sums.get(1))]
        } else if step.is_multiple_of(self.cfg.training.log_every) || step == self.total_steps {
            host::read_vec(&sums)
        } else {
            return Ok(Asks::default());
        };
        Ok(Asks::from_sums(values[0], values[1]))
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
        if host::read_f64(&self.params.master().isfinite().all()) == 0.0 {
            bail!("the weights hold NaN or infinity at step {}: not saved", self.state.step);
        }
        if self.sync.rank() != 0 {
            return self.sync.barrier();
        }
        if let Some(lock) = &mut self.lock {
            lock.check()?;
        }
        oom::saving(self.state.step);
        self.state.loss_scale = self.scaler.as_ref().map(LossScaler::state);
        let (exp_avg, exp_avg_sq) = self.adamw.moments();
        let moments = checkpoint::OptimizerState {
            exp_avg: self.params.to_saved_layout(exp_avg),
            exp_avg_sq: self.params.to_saved_layout(exp_avg_sq),
            step: self.adamw.steps(),
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
        checkpoint::prune(&self.out, self.cfg.checkpoint.keep_last, self.state.step, self.state.run_id.as_deref())?;
        tracing::info!("saved {}", dir.display());
        self.watch.saved(Instant::now());
        self.sync.barrier()
    }

    /// Brings `state.nonfinite_skipped` up to date from the device counters, and
    /// stops the job after `training.max_nonfinite_steps` skipped in a row.
    fn settle_nonfinite(&mut self) -> Result<()> {
        let limit = self.cfg.training.max_nonfinite_steps;
        self.nonfinite.settle(self.state.step, &mut self.state.nonfinite_skipped, limit)
    }
}
