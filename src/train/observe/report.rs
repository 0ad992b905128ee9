//! What a run tells its user: the step log line and metrics record, the
//! evaluations with their records, the "before" and resumed-at lines, the
//! closing comparison and the fill-mask and generation probes.
use super::super::*;
use super::{metrics, oom, plot};

impl Trainer {
    /// Logs the loss, throughput and where the time went since the last log.
    pub(in crate::train) fn log_step(&mut self, loss: Tensor, grad_norm: Tensor, lr: f64) -> Result<()> {
        let step = self.state.step;
        let loss = loss.double_value(&[]);
        let gn = grad_norm.double_value(&[]);
        let mut record = self.timer.report();
        let steps = step - self.window.since_step;
        let step_s: f64 = ["time_data_s", "time_forward_s", "time_backward_s", "time_sync_s", "time_optimizer_s"]
            .iter()
            .map(|k| record[k].as_f64().unwrap_or(0.0))
            .sum();
        // Throughput of the training steps themselves (evaluation and saving excluded).
        let per_worker = self.window.tokens as f64 / (step_s * steps.max(1) as f64);
        // Every worker trains the same number of tokens per step.
        let world = self.sync.world();
        let tps = per_worker * world as f64;
        let tflops = self.window.flops / (step_s * steps.max(1) as f64) / 1e12;
        let peak = self.peak_tflops;
        let mfu = (peak > 0.0).then(|| tflops / peak);
        self.window = LogWindow { since_step: step, ..Default::default() };
        tracing::info!(
            "step {step}/{} epoch {} loss {loss:.4} lr {lr:.3e} grad_norm {gn:.3} tokens/s {tps:.0}{} \
             (data {:.0}% of the step){}",
            self.total_steps,
            self.state.position.epoch,
            if world > 1 { format!(" ({per_worker:.0} per worker)") } else { String::new() },
            100.0 * record["data_wait_fraction"].as_f64().unwrap_or(0.0),
            mfu.map(|m| format!(" MFU {:.1}%", 100.0 * m)).unwrap_or_default()
        );
        let extra = serde_json::json!({
            "kind": "train", "step": step, "epoch": self.state.position.epoch, "loss": loss, "lr": lr,
            "grad_norm": gn, "tokens_per_s": tps, "tokens_per_s_per_worker": per_worker, "step_s": step_s, "model_tflops": tflops, "mfu": mfu,
            "tokens_seen": self.state.tokens_seen, "elapsed_s": self.started.elapsed().as_secs_f64(),
            // The process's peak resident memory so far (on the CPU what the
            // steps allocated; `mlm estimate-memory` predicts peak - startup).
            "peak_rss_bytes": metrics::resident_memory().map(|(_, peak)| peak), "startup_rss_bytes": self.startup_rss,
            "gpu_memory_used_bytes": if self.device.is_cuda() { metrics::gpu_memory_used() } else { None },
            // libtorch's own peak (torch.cuda.max_memory_allocated): what the
            // estimate's job peak predicts, without the cache and the context.
            "gpu_max_allocated_bytes": match self.device {
                tch::Device::Cuda(i) => crate::shims::peak_allocated_bytes(i).ok(),
                _ => None,
            },
        });
        record.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        if let Some(scaler) = &self.scaler {
            // The scale after this step's update, as `GradScaler.get_scale()`.
            record["loss_scale"] = scaler.state().scale.into();
        }
        self.metrics.write(&record)
    }

    /// Held-out perplexity; each worker scores its share of the test batches.
    pub(in crate::train) fn evaluate(&mut self) -> Result<EvalResult> {
        let (rank, world) = (self.sync.rank(), self.sync.world());
        oom::in_evaluation(self.state.step, &self.cfg);
        let mine: Vec<Batch> = self.eval_set.iter().skip(rank).step_by(world).cloned().collect();
        let t0 = Instant::now();
        let progress = if rank == 0 {
            Progress::new(mine.len() as u64, &format!("evaluation at step {}", self.state.step), &self.cfg.logging)
        } else {
            Progress::hidden()
        };
        let local = evaluate(self.model(), &mine, self.device, &progress);
        progress.finish();
        let sums = self.sync.sum(&[local.loss_sum, local.tokens as f64])?;
        let r = EvalResult::from_sums(sums[0], sums[1] as usize);
        if rank != 0 {
            return Ok(r);
        }
        tracing::info!(
            "evaluated {} held-out blocks{} ({} {} tokens) in {:.1} s",
            self.eval_set.iter().map(|b| b.rows).sum::<usize>(),
            if self.cfg.data.eval_files.is_empty() { "" } else { " of data.eval_files" },
            r.tokens,
            if self.masking.causal { "predicted" } else { "masked" },
            t0.elapsed().as_secs_f64()
        );
        if self.history.recorded_eval == Some(self.state.step as u64) {
            // This step's evaluation is recorded (by a killed attempt, by the
            // finished run started again, or at the start of this one): one
            // record per step.
            return Ok(r);
        }
        self.history.recorded_eval = Some(self.state.step as u64);
        self.metrics.write(&serde_json::json!({
            "kind": "eval", "step": self.state.step, "epoch": self.state.position.epoch, "eval_loss": r.loss,
            "perplexity": r.perplexity, "eval_tokens": r.tokens,
            "elapsed_s": self.started.elapsed().as_secs_f64(),
        }))?;
        let metrics_path = self.out.join(&self.cfg.logging.metrics_file);
        if let Err(e) = plot::write(&metrics_path, &self.out.join("curves.png")) {
            tracing::warn!("no plot: {}", crate::logging::one_line(&e));
        }
        Ok(r)
    }

    /// The "before" perplexity and fill-mask probes, when `eval.at_start`.
    pub(in crate::train) fn evaluate_at_start(&mut self) -> Result<Option<EvalResult>> {
        if !self.cfg.eval.at_start {
            return Ok(None);
        }
        let r = self.evaluate()?;
        let when = if self.start_step > 0 {
            tracing::info!("resumed at step {} (held-out perplexity {:.2})", self.start_step, r.perplexity);
            format!("at step {} (resumed)", self.start_step)
        } else {
            let fresh = if self.fresh_head { " (a fresh MLM head: this measures a random head)" } else { "" };
            tracing::info!(
                "held-out perplexity before training: {:.2} (loss {:.4} over {} {} tokens){fresh}",
                r.perplexity,
                r.loss,
                r.tokens,
                if self.masking.causal { "predicted" } else { "masked" }
            );
            "before training".to_string()
        };
        self.probe(&when)?;
        Ok(Some(r))
    }

    /// The closing comparison: against the run's first evaluation (a resumed
    /// run reads it from its metrics), saying when the first model had a fresh
    /// MLM head, whose perplexity is no measure of the pretrained encoder.
    pub(in crate::train) fn log_improvement(&self, start: Option<&EvalResult>, after: &EvalResult) {
        let first = match (self.start_step, self.history.first_eval, start) {
            (0, _, Some(b)) => Some((0, b.perplexity)),
            (_, Some(first), _) => Some(first),
            _ => None,
        };
        let Some((step, p)) = first else { return };
        let what = if step == 0 { "before training".to_string() } else { format!("at step {step}") };
        let fresh = if self.fresh_head {
            "; the first model had a fresh MLM head, so the ratio is not the encoder's gain"
        } else {
            ""
        };
        tracing::info!(
            "held-out perplexity: {p:.2} {what}, {:.2} after step {} ({:.1}x lower){fresh}",
            after.perplexity,
            self.state.step,
            p / after.perplexity
        );
        if let (true, Some(s)) = (self.start_step > 0, start) {
            tracing::info!(
                "this attempt: {:.2} at step {} (resumed), {:.2} after",
                s.perplexity,
                self.start_step,
                after.perplexity
            );
        }
    }

    /// The probes of `[eval]`, on rank 0: each `fill_mask` sentence's top
    /// predictions (masked LM), each `prompts` entry's greedy continuation
    /// (causal LM).
    pub(in crate::train) fn probe(&self, when: &str) -> Result<()> {
        if self.sync.rank() != 0 {
            return Ok(());
        }
        oom::elsewhere();
        for text in &self.cfg.eval.prompts {
            let out = generate(self.model(), &self.tok, text, self.cfg.eval.max_new_tokens, None)
                .with_context(|| format!("eval.prompts entry {text:?}"))?;
            tracing::info!("generate {when}: {text}  ->  {}", out.continuation);
        }
        for text in &self.cfg.eval.fill_mask {
            let preds = fill_mask(self.model(), &self.tok, text, self.cfg.eval.top_k)
                .with_context(|| format!("eval.fill_mask entry {text:?}"))?;
            let shown: Vec<String> = preds.iter().map(|p| format!("{} ({:.3})", p.token_str, p.score)).collect();
            tracing::info!("fill-mask {when}: {text}  ->  {}", shown.join(", "));
        }
        Ok(())
    }
}
