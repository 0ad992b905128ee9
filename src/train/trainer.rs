//! How a [`Trainer`] is set up: the device, the tokenizer and model, the
//! workers, the output folder and data (rank 0 claims them), a resumed
//! checkpoint's weights, moments and position, the flat parameters and the
//! model that runs over them.
use super::*;

impl Trainer {
    pub(super) fn new(cfg: Config) -> Result<Self> {
        let t = &cfg.training;
        if t.threads > 0 {
            tch::set_num_threads(t.threads as i32);
        }
        // The CPU kernels (dropout masks, AdamW) take libtorch's thread count.
        mlm_kernels::start_threads(t.threads);
        let device = ddp::worker_device(select_device(t.device, "training.device")?)?;
        if device.is_cuda() {
            crate::device::set_tf32(t.tf32)?;
            let how = if t.tf32 { "TF32 (training.tf32 = true)" } else { "full fp32 (training.tf32 = false)" };
            tracing::info!("fp32 matmuls on {device:?}: {how}");
        }
        let tok = TextTokenizer::for_job(&cfg)?;
        let startup_rss = metrics::resident_memory().map(|(now, _)| now);
        let Loaded { model: mut master, fresh_head } = load_model(&cfg, device)?;
        check_vocab(&tok, &master)?;
        let objective = crate::model::load::objective(&cfg, &master, &tok)?;
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
        let Claimed { lock, start: StartPoint { checkpoint: resumed, run, discard }, data } =
            claim_output_and_data(&cfg, &tok, &mut sync)?;
        let masking = Arc::new(match objective {
            Objective::Mlm => MaskingParams::new(&cfg.data, &tok)?,
            Objective::Clm => MaskingParams::causal(&cfg.data, &tok),
        });
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
            run_id: run.as_ref().map(|r| r.run_id.clone()),
            parent_run_id: run.as_ref().and_then(|r| r.parent_run_id.clone()),
            epoch_origin: Some(checkpoint::EpochOrigin { step: 0, epoch: 0, steps_per_epoch }),
            ..Default::default()
        };
        let saved = match &resumed {
            Some((dir, _)) => Some(checkpoint::load(dir, &master)?),
            None => None,
        };
        let trainable: Vec<(String, Tensor)> =
            master.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        let qkv = master.qkv_groups();
        let mut params = FlatParams::with_groups(trainable, MaskedLm::no_decay, &qkv)?;
        let mut adamw = AdamW::new(&params, AdamWParams::from(t));
        let is_resume = resumed.is_some();
        if let (Some((dir, saved_state)), Some(moments)) = (resumed, saved) {
            state = resumed_state(&dir, saved_state, state, moments.step, steps_per_epoch)?;
            let (m, v) = (params.from_saved_layout(&moments.exp_avg), params.from_saved_layout(&moments.exp_avg_sq));
            adamw.restore(&m, &v, moments.step);
        }
        let (compute, compute_tensors) = params.compute_model(&mut master, t.precision)?;
        let model = compute.as_ref().unwrap_or(&master);
        let micro_rows =
            micro::rows_per_pass(&cfg, shape.batch_size, model, &compute_tensors, &data.train, &masking, device)?;
        let out = t.output_dir.clone();
        let start_step = state.step;
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
        let kind = t.precision.compute_kind();
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
        let watch = Watch::new(&cfg.checkpoint, sync.rank(), Instant::now());
        let fp16 = t.precision == Precision::Fp16;
        let scaler = fp16.then(|| LossScaler::new(t.loss_scale, device, state.loss_scale));
        if let (Some(s), 0) = (&scaler, sync.rank()) {
            let at = state.loss_scale.map_or("training.loss_scale.init_scale", |_| "the checkpoint");
            tracing::info!("fp16 loss scale {} (from {at})", s.state().scale);
        }
        // Every skipped step so far (settled at the save this run resumes from).
        let schedule_lag = if fp16 { state.nonfinite_skipped } else { 0 };
        let (metrics, history) = if sync.rank() == 0 {
            let start = StartPoint { checkpoint: None, run, discard };
            open_output(&cfg, &start, &state, is_resume)?
        } else {
            (Metrics::disabled(), metrics::History::default())
        };
        Ok(Self {
            lock,
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
            params,
            adamw,
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
            nonfinite: NonFiniteGuard::new(device, start_step, fp16),
            scaler,
            schedule_lag,
            pending_skip: None,
            overlap,
            peak_tflops,
            started: Instant::now(),
            timer: StepTimer::new(device),
            watch,
            asks: None,
            cfg,
        })
    }
}

/// The trainer state of a resumed job: the checkpoint's, with this job's
/// identity (`fresh`: its settings, data and run) kept, once its position is checked against the
/// optimizer's step count.
fn resumed_state(
    dir: &Path,
    saved: TrainerState,
    fresh: TrainerState,
    optimizer_steps: i64,
    steps_per_epoch: usize,
) -> Result<TrainerState> {
    resume::check_position(dir, &saved, steps_per_epoch, optimizer_steps)?;
    let epoch_origin = Some(resume::check_epoch(dir, &saved, steps_per_epoch)?);
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
        run_id: fresh.run_id,
        parent_run_id: fresh.parent_run_id,
        epoch_origin,
        ..saved
    })
}

/// Rank 0's first writes to the output folder, once every check and every
/// part of the setup that can fail have passed, so that a start that fails
/// leaves the folder as it was: TensorBoard's new event file first (the
/// likeliest to fail: a file where its folder should be, no room), unless
/// `tb/` is the earlier run's to delete; then what `overwrite_output_dir`
/// discards, the metrics file (cut back to the resumed step), `run.json`, and
/// `best/` brought up to date. A failure after the event file removes it.
fn open_output(
    cfg: &Config,
    start: &StartPoint,
    state: &TrainerState,
    is_resume: bool,
) -> Result<(Metrics, metrics::History)> {
    let out = &cfg.training.output_dir;
    let tb_dir = cfg.logging.tensorboard.then(|| out.join("tb"));
    let mut tb = match &tb_dir {
        Some(dir) if !start.discard.contains(dir) => Some(EventWriter::create(dir)?),
        _ => None,
    };
    let rest = (|| {
        start.discard_earlier(out)?;
        if let (Some(dir), None) = (&tb_dir, &tb) {
            tb = Some(EventWriter::create(dir)?);
        }
        let path = out.join(&cfg.logging.metrics_file);
        let history = if state.step > 0 {
            metrics::History::keep_until(&path, state.step as u64)?
        } else {
            metrics::History::default()
        };
        let metrics = Metrics::open(&path, None)?;
        resume::record_run(out, start)?;
        if is_resume && cfg.checkpoint.save_best {
            resume::complete_best(out, state)?;
        }
        Ok((metrics, history))
    })();
    match rest {
        Ok((mut metrics, history)) => {
            metrics.set_tensorboard(tb);
            Ok((metrics, history))
        }
        Err(e) => {
            if let Some(tb) = tb {
                tb.remove();
            }
            Err(e)
        }
    }
}

/// What rank 0 settles before training, for every worker: the start point and
/// the prepared data.
struct Claimed {
    /// The output directory's lock (rank 0 only), held for the whole job.
    lock: Option<Lock>,
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
    let show = show_progress(cfg.logging.progress);
    if sync.rank() == 0 {
        let lock = lock_output_dir(out)?;
        checkpoint::recover(out)?;
        let start = resume::plan(cfg, Some(sync.world()), Apply::Apply)?;
        let data = prepare(cfg, tok, show, start.data_key())?;
        let chosen = start.checkpoint.as_ref().map(|(d, _)| d.to_string_lossy().into_owned()).unwrap_or_default();
        sync.broadcast_string(&chosen)?;
        return Ok(Claimed { lock: Some(lock), start, data });
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
        StartPoint { checkpoint: Some((dir, state)), ..Default::default() }
    };
    let data = open_prepared(cfg, tok, start.data_key()).with_context(|| format!("rank {}", sync.rank()))?;
    Ok(Claimed { lock: None, start, data })
}
