use super::*;

#[test]
fn changed_keys_are_named_with_both_values() {
    let a = serde_json::json!({"training": {"lr": 1e-4, "seed": 1}, "data": {"block_size": 128}});
    let b = serde_json::json!({"training": {"lr": 3e-5, "seed": 1}, "data": {"block_size": 128}});
    assert_eq!(differing_keys(&a, &b), vec!["training.lr (0.0001 -> 0.00003)".to_string()]);
}

/// The hash a checkpoint records for `c` on `world` workers.
fn hash(c: &Config, world: usize) -> String {
    config_hash(&shaping_config(c, Some(c.training.batch_shape(world).unwrap().global())))
}

#[test]
fn throughput_knobs_do_not_shape_the_job() {
    let mut c = Config::from_toml("[model]\npath = \"m\"\n").unwrap();
    let (h, job) = (hash(&c, 1), job_hash(&c));
    c.training.threads = 7;
    c.data.masker_threads = 5;
    c.training.micro_batch_size = crate::config::MicroBatchSize::Auto;
    assert_eq!((hash(&c, 1), job_hash(&c)), (h.clone(), job.clone()));
    c.training.micro_batch_size = crate::config::MicroBatchSize::Rows(2);
    assert_eq!((hash(&c, 1), job_hash(&c)), (h.clone(), job.clone()));
    c.training.lr = 1.0;
    assert_ne!(hash(&c, 1), h);
    assert_ne!(job_hash(&c), job);
}

#[test]
fn the_global_batch_shapes_the_job_and_its_split_does_not() {
    let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nglobal_batch_size = 16\n").unwrap();
    let h = hash(&c, 1);
    assert_eq!(hash(&c, 2), h);
    assert_eq!(hash(&c, 16), h);
    let mut split = c.clone();
    split.training.batch_size = Some(2);
    assert_eq!(hash(&split, 4), h, "4 workers x 2 x accumulation 2");
    split.training.global_batch_size = None;
    split.training.grad_accum_steps = Some(4);
    assert_eq!(hash(&split, 2), h, "2 workers x 2 x 4, without global_batch_size");
    assert_ne!(hash(&split, 1), h, "1 worker x 2 x 4 is another global batch");
    // What the workers agree on before they meet is the config as written.
    assert_ne!(job_hash(&split), job_hash(&c));
}

/// A checkpoint of `cfg` on `world` workers in `dir` (its trainer state only).
fn checkpoint_of(dir: &Path, cfg: &Config, world: usize) -> PathBuf {
    let ckpt = dir.join("checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    let shaping = shaping_config(cfg, Some(cfg.training.batch_shape(world).unwrap().global()));
    let state = TrainerState {
        format_version: checkpoint::STATE_FORMAT,
        step: 3,
        config_hash: config_hash(&shaping),
        config: shaping,
        ..Default::default()
    };
    std::fs::write(ckpt.join("trainer_state.json"), serde_json::to_string(&state).unwrap()).unwrap();
    ckpt
}

#[test]
fn a_changed_global_batch_is_refused_naming_it_and_a_changed_world_size_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nglobal_batch_size = 8\n").unwrap();
    let ckpt = checkpoint_of(tmp.path(), &c, 2);
    for world in [1, 2, 4, 8] {
        checked_state(&ckpt, &c, Some(world)).unwrap_or_else(|e| panic!("{world} workers: {e}"));
    }
    let mut other = c.clone();
    other.training.global_batch_size = Some(16);
    let e = checked_state(&ckpt, &other, Some(2)).unwrap_err().to_string();
    assert!(e.contains("training.global_batch_size (8 -> 16)") && e.contains("allow_config_change"), "{e}");
    // `mlm prepare` does not know the world size: it leaves the batch to `mlm train`.
    checked_state(&ckpt, &other, None).unwrap();
    // Per-worker keys: another world size is another global batch, and the
    // error says how to keep it.
    let mut per_worker = c.clone();
    (per_worker.training.global_batch_size, per_worker.training.batch_size) = (None, Some(4));
    checked_state(&ckpt, &per_worker, Some(2)).unwrap();
    let e = checked_state(&ckpt, &per_worker, Some(4)).unwrap_err().to_string();
    assert!(e.contains("training.global_batch_size (8 -> 16)") && e.contains("set training.global_batch_size"), "{e}");
    other.checkpoint.allow_config_change = true;
    checked_state(&ckpt, &other, Some(2)).unwrap();
}

#[test]
fn a_format_1_checkpoint_resumes_on_its_world_size_with_its_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let c = Config::from_toml("[model]\npath = \"m\"\n[training]\nbatch_size = 4\ngrad_accum_steps = 2\n").unwrap();
    let ckpt = tmp.path().join("checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    // As format 1 wrote it: the per-worker keys in the config, the position in batches.
    let mut config = written_shaping(&c);
    config["training"]["batch_size"] = 4.into();
    config["training"]["grad_accum_steps"] = 2.into();
    let old = serde_json::json!({
        "format_version": 1, "step": 3, "epoch": 0, "batch_in_epoch": 6, "best_perplexity": null,
        "best_step": null, "seed": 42, "tokens_seen": 0, "nonfinite_skipped": 0, "config_hash": "x",
        "config": config,
    });
    std::fs::write(ckpt.join("trainer_state.json"), old.to_string()).unwrap();
    let s = checked_state(&ckpt, &c, Some(2)).unwrap();
    assert_eq!(s.position.step_in_epoch, 3);
    let mut g = c.clone();
    (g.training.global_batch_size, g.training.batch_size, g.training.grad_accum_steps) = (Some(16), None, None);
    checked_state(&ckpt, &g, Some(2)).unwrap();
    let e = checked_state(&ckpt, &g, Some(1)).unwrap_err().to_string();
    assert!(e.contains("training.global_batch_size (8 -> 16)"), "{e}");
}

/// [`plan`] for rank 0 of `mlm train`, which then deletes what it discards.
fn planned(c: &Config) -> Result<StartPoint> {
    let start = plan(c, Some(1), Apply::Apply)?;
    start.discard_earlier(&c.training.output_dir)?;
    Ok(start)
}

#[test]
fn overwrite_deletes_an_earlier_runs_logs_and_events_even_without_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("tb")).unwrap();
    std::fs::write(out.join("tb/events.out.tfevents.1.host.2.mlm"), "old").unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"kind\":\"train\",\"step\":2}\n").unwrap();
    checkpoint::write_run(&out, &run_of("aaaa")).unwrap();
    let mut c = Config::from_toml("[model]\npath = \"m\"\n[checkpoint]\nresume = \"none\"\n").unwrap();
    c.training.output_dir = out.clone();
    c.checkpoint.overwrite_output_dir = true;
    let start = plan(&c, Some(1), Apply::Check).unwrap();
    assert!(start.discard.is_empty() && out.join("tb").is_dir(), "a check deletes nothing");
    let start = plan(&c, Some(1), Apply::Apply).unwrap();
    assert_eq!(start.discard.len(), 3, "{:?}", start.discard);
    assert!(out.join("tb").is_dir() && out.join("metrics.jsonl").is_file(), "plan only lists");
    start.discard_earlier(&out).unwrap();
    for f in ["tb", "metrics.jsonl", "run.json"] {
        assert!(!out.join(f).exists(), "{f} kept");
    }
}

#[test]
fn a_fresh_start_into_a_used_directory_is_refused_and_overwrite_deletes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("checkpoint-200")).unwrap();
    std::fs::create_dir_all(out.join("best")).unwrap();
    let mut c = Config::from_toml("[model]\npath = \"m\"\n[checkpoint]\nresume = \"none\"\n").unwrap();
    c.training.output_dir = out.clone();
    let e = planned(&c).unwrap_err().to_string();
    assert!(e.contains("checkpoint-200/") && e.contains("overwrite_output_dir"), "{e}");
    assert!(out.join("checkpoint-200").exists() && out.join("best").exists());
    c.checkpoint.overwrite_output_dir = true;
    plan(&c, Some(1), Apply::Check).unwrap();
    assert!(out.join("checkpoint-200").exists(), "a check deletes nothing");
    assert!(planned(&c).unwrap().checkpoint.is_none());
    assert!(!out.join("checkpoint-200").exists() && !out.join("best").exists());
}

/// A resumable checkpoint of `cfg` at `step` in `out`, written by the run `run`
/// (its trainer state, a stand-in optimizer file, checksums).
fn checkpoint_of_run(out: &Path, cfg: &Config, step: usize, run: Option<&str>) -> PathBuf {
    let dir = out.join(format!("checkpoint-{step}"));
    std::fs::create_dir_all(&dir).unwrap();
    let shaping = shaping_config(cfg, Some(cfg.training.batch_shape(1).unwrap().global()));
    let state = TrainerState {
        format_version: checkpoint::STATE_FORMAT,
        step,
        config_hash: config_hash(&shaping),
        config: shaping,
        run_id: run.map(String::from),
        ..Default::default()
    };
    std::fs::write(dir.join("trainer_state.json"), serde_json::to_string(&state).unwrap()).unwrap();
    std::fs::write(dir.join("optimizer.safetensors"), "stand-in").unwrap();
    let sums: std::collections::BTreeMap<String, String> = ["trainer_state.json", "optimizer.safetensors"]
        .map(|f| (f.to_string(), checkpoint::sha256_file(&dir.join(f)).unwrap()))
        .into();
    std::fs::write(dir.join("checksums.json"), serde_json::to_string(&sums).unwrap()).unwrap();
    dir
}

fn run_of(id: &str) -> RunIdentity {
    RunIdentity { run_id: id.into(), ..Default::default() }
}

fn job_in(out: &Path) -> Config {
    let mut c = Config::from_toml("[model]\npath = \"m\"\n").unwrap();
    c.training.output_dir = out.to_path_buf();
    c
}

#[test]
fn another_runs_checkpoint_is_refused_beside_a_run_and_forks_into_an_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut c = job_in(&a);
    checkpoint_of_run(&a, &c, 4, Some("aaaa"));
    std::fs::create_dir_all(a.join("best")).unwrap();
    checkpoint::write_run(&a, &run_of("aaaa")).unwrap();
    let theirs = checkpoint_of_run(&b, &c, 6, Some("bbbb"));
    checkpoint::write_run(&b, &run_of("bbbb")).unwrap();
    c.checkpoint.resume = Resume::Path(theirs.clone());
    let e = planned(&c).unwrap_err().to_string();
    assert!(
        e.contains("holds run aaaa (checkpoint-4/, best/)")
            && e.contains("checkpoint of run bbbb")
            && e.contains("overwrite_output_dir"),
        "{e}"
    );
    assert!(a.join("checkpoint-4").is_dir() && a.join("best").is_dir());
    assert_eq!(checkpoint::read_run(&a).unwrap(), Some(run_of("aaaa")));
    // Into an empty folder: a new run that records its parent.
    let mut fork = c.clone();
    fork.training.output_dir = tmp.path().join("c");
    let run = planned(&fork).unwrap().run.unwrap();
    assert_eq!(run.parent_run_id.as_deref(), Some("bbbb"));
    assert_ne!(run.run_id, "bbbb");
    assert_eq!(run.forked_from, Some(std::fs::canonicalize(&theirs).unwrap()));
    // Overwriting deletes the folder's run first, then forks.
    c.checkpoint.overwrite_output_dir = true;
    let run = planned(&c).unwrap().run.unwrap();
    assert_eq!(run.parent_run_id.as_deref(), Some("bbbb"));
    assert!(!a.join("checkpoint-4").exists() && !a.join("best").exists() && !a.join("run.json").exists());
    assert!(theirs.is_dir(), "the parent's checkpoint is kept");
}

#[test]
fn the_folders_own_checkpoints_continue_its_run_with_or_without_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let c = job_in(&out);
    // A folder and checkpoint from before run ids: the same run, given an id.
    checkpoint_of_run(&out, &c, 3, None);
    let run = planned(&c).unwrap().run.unwrap();
    assert_eq!((run.run_id.len(), run.parent_run_id, run.forked_from), (16, None, None));
    // A folder that has an id and an old checkpoint of its own keeps the id.
    checkpoint::write_run(&out, &run_of("f0f0")).unwrap();
    assert_eq!(planned(&c).unwrap().run, Some(run_of("f0f0")));
    // A checkpoint of the folder's run from another folder continues it.
    let copy = checkpoint_of_run(&tmp.path().join("moved"), &c, 3, Some("f0f0"));
    let mut from_copy = c.clone();
    from_copy.checkpoint.resume = Resume::Path(copy);
    assert_eq!(planned(&from_copy).unwrap().run, Some(run_of("f0f0")));
    // A fresh start is a new run.
    let mut fresh = job_in(&tmp.path().join("fresh"));
    fresh.checkpoint.resume = Resume::None;
    let run = plan(&fresh, Some(1), Apply::Check).unwrap().run.unwrap();
    assert_ne!(run.run_id, "f0f0");
}

#[test]
fn a_link_where_the_run_writes_is_refused_before_anything_is_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut c = job_in(&out);
    checkpoint_of_run(&out, &c, 3, Some("aaaa"));
    let outside = tmp.path().join("outside.jsonl");
    std::fs::write(&outside, "theirs").unwrap();
    std::os::unix::fs::symlink(&outside, out.join("metrics.jsonl")).unwrap();
    (c.checkpoint.resume, c.checkpoint.overwrite_output_dir) = (Resume::None, true);
    let e = planned(&c).unwrap_err().to_string();
    assert!(e.contains("metrics.jsonl is a symbolic link"), "{e}");
    assert!(out.join("checkpoint-3").is_dir());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "theirs");
    // The output folder itself may be a link.
    std::fs::remove_file(out.join("metrics.jsonl")).unwrap();
    let linked = tmp.path().join("linked");
    std::os::unix::fs::symlink(&out, &linked).unwrap();
    let mut via_link = job_in(&linked);
    via_link.checkpoint.resume = Resume::Auto;
    assert_eq!(planned(&via_link).unwrap().run.unwrap().run_id, "aaaa");
}

#[test]
fn a_state_whose_epoch_contradicts_its_step_is_refused() {
    use crate::checkpoint::EpochOrigin;
    use crate::data::loader::Position;
    let dir = Path::new("/runs/out/checkpoint-13");
    let origin = EpochOrigin { step: 0, epoch: 0, steps_per_epoch: 5 };
    let state = |step, epoch, step_in_epoch, epoch_origin| TrainerState {
        step,
        position: Position { epoch, step_in_epoch },
        epoch_origin,
        ..Default::default()
    };
    // Step 13 of epochs of 5 steps: epoch 2, step 3 of it; the end of an epoch
    // may be recorded either way.
    assert_eq!(check_epoch(dir, &state(13, 2, 3, Some(origin)), 5).unwrap(), origin);
    assert_eq!(check_epoch(dir, &state(10, 1, 5, Some(origin)), 5).unwrap(), origin);
    assert_eq!(check_epoch(dir, &state(10, 2, 0, Some(origin)), 5).unwrap(), origin);
    for (epoch, in_epoch) in [(1, 3), (3, 3), (2, 4), (0, 13)] {
        let e = check_epoch(dir, &state(13, epoch, in_epoch, Some(origin)), 5).unwrap_err().to_string();
        assert!(
            e.contains("checkpoint-13/trainer_state.json")
                && e.contains(&format!("epoch {epoch} and step_in_epoch {in_epoch}"))
                && e.contains("step 13"),
            "{e}"
        );
    }
    // A hostile epoch does not overflow.
    assert!(check_epoch(dir, &state(13, usize::MAX, 3, Some(origin)), 5).is_err());
    // Another epoch length (allowed config change): counted from the start of
    // the epoch it resumes in; the same rule on the next resume.
    let moved = check_epoch(dir, &state(13, 2, 3, Some(origin)), 4).unwrap();
    assert_eq!(moved, EpochOrigin { step: 10, epoch: 2, steps_per_epoch: 4 });
    assert!(check_epoch(dir, &state(17, 3, 3, Some(moved)), 4).is_ok());
    assert!(check_epoch(dir, &state(17, 4, 3, Some(moved)), 4).is_err());
    // A state from before origins: only what any history allows.
    assert_eq!(
        check_epoch(dir, &state(13, 2, 3, None), 5).unwrap(),
        EpochOrigin { step: 10, epoch: 2, steps_per_epoch: 5 }
    );
    assert!(check_epoch(dir, &state(13, 11, 3, None), 5).is_err());
    assert!(check_epoch(dir, &state(3, 0, 4, None), 5).is_err());
}
