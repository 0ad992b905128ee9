//! Bad input gets one clear line naming the problem and a non-zero exit, never a
//! panic, and never touches what a job already wrote: every case runs against an
//! output directory holding a finished checkpoint, `best/` and prepared data, and
//! checks afterwards that all of it is byte for byte as before.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::common::*;

/// An output directory of a finished 4-step job (made once per test run).
fn trained_output() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir("bad-input-fixture");
        let cfg = write_job(&dir, "");
        let ok = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success();
        assert!(ok, "fixture job failed");
        dir.join("out")
    })
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Every file under `dir` with its content.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name() != "metrics.jsonl" && !e.file_name().to_string_lossy().ends_with(".lock") {
                out.insert(e.path().strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

/// A job directory whose output holds the finished job; returns (dir, config).
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    copy_tree(trained_output(), &dir.path().join("out"));
    (dir, cfg)
}

/// Runs `mlm <args> <cfg> <after>`, expecting one error line that contains every
/// string of `expect`, and the output directory unchanged. The job's config
/// differs from the finished run's (at least in max_steps): the resume is
/// allowed to go on, so that the bad input itself is what fails.
fn fails(dir: &Path, args: &[&str], cfg: &Path, after: &[&str], expect: &[&str]) {
    let allow = ["--set", "checkpoint.allow_config_change=true"];
    fails_resuming(dir, args, cfg, &[after, &allow].concat(), expect)
}

/// [`fails`] without allowing a changed config: for the refusals of a resume.
fn fails_resuming(dir: &Path, args: &[&str], cfg: &Path, after: &[&str], expect: &[&str]) {
    let out_dir = dir.join("out");
    let before = snapshot(&out_dir);
    let out = run(mlm().args(args).arg(cfg).args(after).args(["--set", "logging.progress=never"]));
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for e in expect {
        assert!(errors[0].contains(e), "{:?} lacks {e:?}", errors[0]);
    }
    let after_snap = snapshot(&out_dir);
    assert_eq!(before.keys().collect::<Vec<_>>(), after_snap.keys().collect::<Vec<_>>(), "files changed");
    assert!(before == after_snap, "existing files were modified");
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn set_files(cfg: &Path, files: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let start = text.find("files = [").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(cfg, format!("{}files = [{files}]{}", &text[..start], &text[end..])).unwrap();
}

#[test]
fn missing_input_file_is_named() {
    let (dir, cfg) = setup();
    set_files(&cfg, "\"/no/such/corpus.txt\"");
    fails(dir.path(), &["prepare"], &cfg, &[], &["/no/such/corpus.txt"]);
}

#[test]
fn input_path_that_is_a_directory_is_named() {
    let (dir, cfg) = setup();
    set_files(&cfg, &format!("{:?}", dir.path()));
    fails(dir.path(), &["train"], &cfg, &[], &[&dir.path().display().to_string()]);
}

#[test]
fn empty_corpus_is_refused() {
    let (dir, cfg) = setup();
    std::fs::write(dir.path().join("empty.txt"), "\n\n   \n").unwrap();
    set_files(&cfg, &format!("{:?}", dir.path().join("empty.txt")));
    fails(dir.path(), &["prepare"], &cfg, &[], &["empty.txt", "no text"]);
}

#[test]
fn corpus_shorter_than_one_block_is_refused() {
    let (dir, cfg) = setup();
    std::fs::write(dir.path().join("short.txt"), "A short text.\n").unwrap();
    set_files(&cfg, &format!("{:?}", dir.path().join("short.txt")));
    fails(dir.path(), &["prepare"], &cfg, &[], &["block_size"]);
}

#[test]
fn non_utf8_input_is_named_with_its_offset() {
    let (dir, cfg) = setup();
    let corpus = dir.path().join("latin1.txt");
    std::fs::write(&corpus, b"Some text, then Latin-1: caf\xe9 and more.\n").unwrap();
    set_files(&cfg, &format!("{corpus:?}"));
    fails(dir.path(), &["prepare"], &cfg, &[], &["latin1.txt", "UTF-8", "offset 28"]);
}

#[test]
fn malformed_jsonl_line_is_named() {
    let (dir, cfg) = setup();
    let corpus = dir.path().join("docs.jsonl");
    std::fs::write(&corpus, "{\"text\": \"fine\"}\n{\"text\": unquoted}\n").unwrap();
    set_files(&cfg, &format!("{corpus:?}"));
    fails(dir.path(), &["prepare"], &cfg, &[], &["docs.jsonl", "2"]);
}

#[test]
fn malformed_toml_names_line_and_column() {
    let (dir, cfg) = setup();
    edit(&cfg, "lr = 2e-3", "lr = = 2e-3");
    fails(dir.path(), &["train"], &cfg, &[], &["job.toml", "line"]);
}

#[test]
fn missing_config_file_is_named() {
    let (dir, _) = setup();
    fails(dir.path(), &["train"], &dir.path().join("nope.toml"), &[], &["nope.toml"]);
}

#[test]
fn unknown_config_key_is_named_with_its_line() {
    let (dir, cfg) = setup();
    edit(&cfg, "lr = 2e-3", "lr = 2e-3\nlearnig_rate = 1");
    let line = std::fs::read_to_string(&cfg).unwrap().lines().position(|l| l.starts_with("learnig_rate")).unwrap() + 1;
    fails(dir.path(), &["train"], &cfg, &[], &["learnig_rate", &format!("line {line}")]);
}

#[test]
fn wrong_value_type_is_named() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.batch_size=\"eight\""], &["batch_size"]);
}

#[test]
fn zero_batch_size_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.batch_size=0"], &["training.batch_size"]);
}

#[test]
fn out_of_range_values_are_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "data.test_fraction=1.5"], &["data.test_fraction"]);
    fails(dir.path(), &["train"], &cfg, &["--set", "data.mlm_probability=0"], &["data.mlm_probability"]);
}

#[test]
fn malformed_override_is_named() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.lr"], &["training.lr", "section.key=value"]);
}

#[test]
fn tokenizer_larger_than_model_vocabulary_is_refused() {
    let (dir, cfg) = setup();
    edit(&dir.path().join("tiny-bert.json"), "30522", "1000");
    fails(dir.path(), &["train"], &cfg, &[], &["30522", "1000", "tokenizer"]);
}

#[test]
fn block_size_above_model_positions_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--set", "data.block_size=512"], &["block_size", "512", "128"]);
}

#[test]
fn unsupported_model_type_is_named() {
    let (dir, cfg) = setup();
    edit(&dir.path().join("tiny-bert.json"), "\"model_type\": \"bert\"", "\"model_type\": \"t5\"");
    edit(&dir.path().join("tiny-bert.json"), "BertForMaskedLM", "T5ForConditionalGeneration");
    fails(dir.path(), &["train"], &cfg, &[], &["t5"]);
}

#[test]
fn missing_model_directory_is_named() {
    let (dir, cfg) = setup();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("config = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}path = \"/no/such/model\"{}", &text[..start], &text[end..])).unwrap();
    fails(dir.path(), &["train"], &cfg, &[], &["/no/such/model"]);
}

#[test]
fn corrupt_safetensors_is_named() {
    let (dir, cfg) = setup();
    let model = dir.path().join("broken-model");
    copy_tree(&trained_output().join("best"), &model);
    let f = model.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let start = text.find("config = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(&cfg, format!("{}path = {:?}{}", &text[..start], model, &text[end..])).unwrap();
    fails(dir.path(), &["train"], &cfg, &[], &["model.safetensors"]);
}

#[test]
fn output_directory_that_cannot_be_created_is_named() {
    let (dir, cfg) = setup();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a directory").unwrap();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", &format!("training.output_dir={:?}", blocker.join("out"))],
        &["a-file"],
    );
}

#[test]
fn full_disk_while_writing_metrics_is_reported() {
    // The metrics file is /dev/full: every write fails with ENOSPC. (Not a
    // link to it: a link where a run file should be is refused as a link.)
    let (dir, cfg) = setup();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &[
            "--set",
            "training.max_steps=8",
            "--set",
            "checkpoint.allow_config_change=true",
            "--set",
            "logging.metrics_file=\"/dev/full\"",
        ],
        &["metrics", "No space left on device"],
    );
}

#[test]
fn resume_from_a_directory_that_is_not_a_checkpoint_is_refused() {
    let (dir, cfg) = setup();
    fails(dir.path(), &["train"], &cfg, &["--resume", "/tmp"], &["checkpoint.resume", "/tmp"]);
}

#[test]
fn fill_mask_without_mask_token_is_refused() {
    let out = run(mlm().args(["fill-mask", "--model"]).arg(minilm_dir()).arg("No mask here."));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[MASK]") && !stderr.contains("panicked"), "{stderr}");
    // A 10 KB input is quoted as an excerpt with its length, not repeated whole.
    let long = "No mask here. ".repeat(750);
    let e = error_line(&run(mlm().args(["fill-mask", "--model"]).arg(minilm_dir()).arg(&long)));
    assert!(e.contains("no mask token [MASK] in \"No mask here.") && e.contains("…\" (10500 characters)"), "{e}");
    assert!(e.len() < 200, "{e}");
}

#[test]
fn bench_peak_out_of_memory_is_one_line_with_bench_advice() {
    // Two 32768^2 fp32 matrices (4 GiB each) under a 3 GB address-space
    // limit, with RUST_BACKTRACE set: one line, advising bench-peak's own flag.
    let o = run(std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000; exec {:?} bench-peak --device cpu --precision fp32 --size 32768",
            env!("CARGO_BIN_EXE_mlm")
        ))
        .env("RUST_BACKTRACE", "1"));
    assert_eq!(o.status.code(), Some(1));
    let e = error_line(&o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("frame #") && !stderr.contains("stack backtrace"), "{stderr}");
    assert!(e.starts_with("error: out of memory measuring the peak") && e.contains("--size 32768"), "{e}");
    assert!(e.contains("a smaller --size (e.g. 16384)") && !e.contains("training."), "{e}");
}

#[test]
fn gpu_workers_without_a_gpu_are_refused_before_any_work() {
    if ["/dev/nvidiactl", "/proc/driver/nvidia"].iter().any(|p| Path::new(p).exists()) {
        eprintln!("SKIPPED: an NVIDIA driver is loaded here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let o = run(std::process::Command::new(launcher())
        .args(["--gpus", "2", "--mlm"])
        .arg(env!("CARGO_BIN_EXE_mlm"))
        .arg(&cfg)
        .env_remove("CUDA_VISIBLE_DEVICES"));
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, nothing prepared or started first: {stderr}");
    assert!(lines[0].contains("no GPU is visible") && lines[0].contains("--nproc N --device cpu"), "{stderr}");
    assert!(!dir.path().join("out").exists(), "nothing may be prepared");
}

#[test]
fn train_in_a_slurm_batch_script_of_two_tasks_runs_as_one_process_and_says_so() {
    // The batch script's own variables (no step id): not an MPI rank.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let mut c = mlm();
    c.arg("train").arg(&cfg).args(["--set", "training.max_steps=2", "--set", "eval.at_start=false"]);
    c.args(["--set", "training.log_every=1"]);
    for k in ["SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"] {
        c.env_remove(k);
    }
    for k in ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "RANK", "WORLD_SIZE", "MLM_MASTER_PORT", "MASTER_PORT"] {
        c.env_remove(k);
    }
    c.envs([("SLURM_JOB_ID", "4242"), ("SLURM_NTASKS", "2"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0")]);
    c.env("SLURM_JOB_NODELIST", "localhost");
    let o = run(&mut c);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("MPI"), "{stderr}");
    let notes: Vec<&str> = stderr.lines().filter(|l| l.contains("Slurm batch script")).collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(notes[0].contains("SLURM_NTASKS=2") && notes[0].contains("srun mlm train"), "{stderr}");
    assert_eq!(losses(&dir.path().join("out")).len(), 2, "{stderr}");
}

#[test]
fn diverging_training_stops_after_non_finite_steps_and_saves_nothing() {
    // lr 1e30 blows the weights up after one step: every later step has a
    // non-finite loss, is skipped, and after 5 in a row the job stops (at the
    // next log step, where the skips counted on the device are read); the
    // existing checkpoints stay as they were and no NaN weights are written.
    let (dir, cfg) = setup();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &[
            "--set",
            "training.lr=1e30",
            "--set",
            "training.max_steps=40",
            "--set",
            "checkpoint.allow_config_change=true",
        ],
        &["non-finite", "5 steps in a row"],
    );
}

/// Runs `cmd`, expecting one error line holding every string of `expect`, and
/// no panic.
fn fails_cmd(cmd: &mut std::process::Command, expect: &[&str]) {
    let out = run(cmd);
    assert!(!out.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
    for e in expect {
        assert!(errors[0].contains(e), "{:?} lacks {e:?}", errors[0]);
    }
}

#[test]
fn numbers_outside_their_meaning_are_refused() {
    let (dir, cfg) = setup();
    for (set, key) in [
        ("training.adam_beta1=1", "training.adam_beta1"),
        ("training.adam_beta2=1", "training.adam_beta2"),
        ("training.adam_eps=0", "training.adam_eps"),
        ("training.max_grad_norm=-1", "training.max_grad_norm"),
        ("training.weight_decay=-5", "training.weight_decay"),
        ("training.lr=nan", "training.lr"),
        ("data.test_fraction=0", "data.test_fraction"),
        ("data.test_size=1000000000", "data.test_size"),
        ("data.mlm_probability=nan", "data.mlm_probability"),
        ("data.mlm_probability=2.5", "data.mlm_probability"),
        ("data.random_replace_prob=-0.1", "data.random_replace_prob"),
        ("training.output_dir=\"\"", "training.output_dir"),
        ("eval.top_k=0", "eval.top_k"),
        ("distributed.timeout_s=0", "distributed.timeout_s"),
    ] {
        fails(dir.path(), &["train"], &cfg, &["--set", set], &[key]);
    }
}

#[test]
fn random_init_configs_with_impossible_sizes_are_refused() {
    for (from, to, key) in [
        ("\"hidden_size\": 64", "\"hidden_size\": -64", "hidden_size"),
        ("\"hidden_dropout_prob\": 0.1", "\"hidden_dropout_prob\": 1.5", "hidden_dropout_prob"),
        ("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 0", "num_hidden_layers"),
        ("\"hidden_size\": 64", "\"hidden_size\": 1000000", "hidden_size"),
        ("\"layer_norm_eps\": 1e-12", "\"layer_norm_eps\": 0", "layer_norm_eps"),
    ] {
        let (dir, cfg) = setup();
        edit(&dir.path().join("tiny-bert.json"), from, to);
        fails(dir.path(), &["train"], &cfg, &[], &[key, "config.json"]);
    }
    // Within every bound but too large for this machine: refused before allocating.
    let (dir, cfg) = setup();
    edit(&dir.path().join("tiny-bert.json"), "\"hidden_size\": 64", "\"hidden_size\": 65536");
    edit(&dir.path().join("tiny-bert.json"), "\"num_attention_heads\": 4", "\"num_attention_heads\": 1024");
    edit(&dir.path().join("tiny-bert.json"), "\"intermediate_size\": 128", "\"intermediate_size\": 262144");
    fails(dir.path(), &["train"], &cfg, &["--set", "data.block_size=64"], &["parameters", "memory available"]);
}

#[test]
fn command_line_numbers_outside_their_meaning_are_refused() {
    let model = minilm_dir();
    let eval = |extra: &[&str]| {
        let mut c = mlm();
        c.args(["eval", "--device", "cpu", "--model"]).arg(&model).arg("--data").arg(corpus_glob()).args(extra);
        c
    };
    fails_cmd(&mut eval(&["--block-size", "0"]), &["--block-size"]);
    fails_cmd(&mut eval(&["--batch-size", "0"]), &["--batch-size"]);
    for p in ["0", "nan", "2.5"] {
        fails_cmd(&mut eval(&["--mlm-probability", p]), &["--mlm-probability"]);
    }
    fails_cmd(mlm().args(["fill-mask", "--top-k", "0", "--model"]).arg(&model).arg("A [MASK]."), &["--top-k"]);
    fails_cmd(mlm().args(["bench-peak", "--size", "0"]), &["--size"]);
    let check = env!("CARGO_BIN_EXE_mlm-comm-check");
    for args in [["--elems", "0"], ["--elems", "99999999999999"], ["--iters", "0"], ["--timeout", "0"]] {
        fails_cmd(std::process::Command::new(check).args(args).env_remove("WORLD_SIZE"), &[args[0]]);
    }
}

#[test]
fn a_missing_gpu_is_blamed_on_the_flag_that_asked_for_it() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return; // a GPU machine: cuda is there to be had
    }
    fails_cmd(
        mlm().args(["fill-mask", "--device", "cuda", "--model"]).arg(minilm_dir()).arg("A [MASK]."),
        &["--device = cuda"],
    );
}

#[test]
fn a_refused_resume_does_not_rebuild_the_prepared_data() {
    // `fails` checks that out/ (with out/data) is byte for byte unchanged.
    let (dir, cfg) = setup();
    fails_resuming(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "data.block_size=32"],
        &["config changed", "data.block_size"],
    );
    fails_resuming(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", "data.block_size=32"],
        &["config changed", "data.block_size"],
    );
}

#[test]
fn a_corpus_changed_after_the_run_is_refused_before_it_is_prepared_again() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    for f in glob::glob(&corpus_glob()).unwrap().flatten().take(6) {
        std::fs::copy(&f, corpus.join(f.file_name().unwrap())).unwrap();
    }
    let cfg = write_job_on(dir.path(), &[corpus.join("*.txt").to_string_lossy().into_owned()], "");
    assert!(run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success());
    let extra = corpus.join("zz-new.rst.txt");
    std::fs::copy(corpus.join(std::fs::read_dir(&corpus).unwrap().next().unwrap().unwrap().file_name()), &extra)
        .unwrap();
    fails_resuming(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=4"],
        &["trained on other data", "allow_config_change"],
    );
}

#[test]
fn prepared_dir_naming_a_users_file_or_folder_is_refused() {
    let (dir, cfg) = setup();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, "my notes").unwrap();
    fails(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", &format!("data.prepared_dir={notes:?}")],
        &["notes.txt", "not a prepared token store"],
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    let folder = dir.path().join("my-corpus");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("a.txt"), "keep me").unwrap();
    fails(
        dir.path(),
        &["prepare"],
        &cfg,
        &["--set", &format!("data.prepared_dir={folder:?}")],
        &["my-corpus", "not a prepared token store"],
    );
    assert_eq!(std::fs::read_to_string(folder.join("a.txt")).unwrap(), "keep me");
}

#[test]
fn an_interrupted_preparation_leaves_nothing_behind_for_long() {
    let (dir, cfg) = setup();
    let out = dir.path().join("out");
    for leftover in [".data.tmp-4242", "data.tmp-4343"] {
        std::fs::create_dir(out.join(leftover)).unwrap();
        std::fs::write(out.join(leftover).join("train.bin"), vec![0u8; 4096]).unwrap();
    }
    // Another split (allowed explicitly): the store is prepared again, and
    // the leftovers of the interrupted preparations are removed first.
    let o = run(mlm().arg("prepare").arg(&cfg).args([
        "--set",
        "data.split_seed=7",
        "--set",
        "checkpoint.allow_config_change=true",
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(leftovers(&out), Vec::<String>::new());
}

#[test]
fn a_trainer_state_with_an_impossible_step_is_refused() {
    let (dir, cfg) = setup();
    let ck = dir.path().join("out/checkpoint-4");
    edit(&ck.join("trainer_state.json"), "\"step\": 4", "\"step\": 999");
    // Keep the checksums consistent: only the content is impossible.
    let sums = ck.join("checksums.json");
    let text = std::fs::read_to_string(&sums).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["trainer_state.json"] = mlm::checkpoint::sha256_file(&ck.join("trainer_state.json")).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=8", "--set", "checkpoint.allow_config_change=true"],
        &["step 999", "checkpoint-4"],
    );
}

/// Rewrites `<dir>/out/data/train.tokens` with `f`.
fn tamper_store(dir: &Path, f: impl Fn(&mut [u8])) {
    let train_bin = dir.join("out/data/train.tokens");
    let mut bytes = std::fs::read(&train_bin).unwrap();
    f(&mut bytes);
    std::fs::write(&train_bin, &bytes).unwrap();
}

#[test]
fn a_token_store_changed_after_preparation_is_refused_naming_the_file() {
    let (dir, cfg) = setup();
    // One token swapped for another of the vocabulary: nothing but the
    // checksum can tell, and an evaluation would silently change.
    tamper_store(dir.path(), |b| {
        let t = u32::from_le_bytes(b[4..8].try_into().unwrap());
        b[4..8].copy_from_slice(&(if t == 2000 { 2001u32 } else { 2000 }).to_le_bytes());
    });
    let expect = ["train.tokens", "does not match its checksum", "prepare the data again"];
    fails(dir.path(), &["train"], &cfg, &["--set", "training.max_steps=8"], &expect);
    fails(dir.path(), &["prepare"], &cfg, &[], &expect);
}

/// Rewrites `trainer_state.json` of `ck` with `edit` and its checksum to match:
/// only the content is wrong.
fn edit_state(ck: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = ck.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(&path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
    let sums = ck.join("checksums.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sums).unwrap()).unwrap();
    v["trainer_state.json"] = mlm::checkpoint::sha256_file(&path).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn a_trainer_state_whose_epoch_contradicts_its_step_is_refused() {
    let (dir, cfg) = setup();
    let ck = dir.path().join("out/checkpoint-4");
    edit_state(&ck, |s| s["epoch"] = (s["epoch"].as_u64().unwrap() + 1).into());
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &["--set", "training.max_steps=8"],
        &["checkpoint-4/trainer_state.json", "epoch", "step_in_epoch", "step 4"],
    );
}

/// Writes NaN into the first value of parameter `name` of `<dir>/model.safetensors`.
fn poison(dir: &Path, name: &str, value: f32) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
}

#[test]
fn a_model_with_nan_weights_is_refused_at_load_naming_the_file_and_parameter() {
    let (dir, cfg) = setup();
    let model = dir.path().join("nan-model");
    copy_tree(&dir.path().join("out/best"), &model);
    let param = "bert.encoder.layer.1.output.dense.weight";
    poison(&model, param, f32::NAN);
    let expect = ["nan-model/model.safetensors", param, "NaN or infinite"];
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat and looked at the dog. ".repeat(40)).unwrap();
    let model_arg = model.to_string_lossy().into_owned();
    let text_arg = text.to_string_lossy().into_owned();
    let eval = ["--model", &model_arg, "--data", &text_arg, "--block-size", "32"];
    fails_cmd(mlm().arg("eval").args(eval), &expect);
    fails_cmd(mlm().args(["fill-mask", "--model", &model_arg, "the [MASK] sat."]), &expect);
    // A checkpoint to resume is checked as well.
    poison(&dir.path().join("out/checkpoint-4"), param, f32::INFINITY);
    let sums = dir.path().join("out/checkpoint-4/checksums.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sums).unwrap()).unwrap();
    v["model.safetensors"] =
        mlm::checkpoint::sha256_file(&dir.path().join("out/checkpoint-4/model.safetensors")).unwrap().into();
    std::fs::write(&sums, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    fails(dir.path(), &["train"], &cfg, &["--set", "training.max_steps=8"], &["checkpoint-4/model.safetensors", param]);
}

#[test]
fn token_ids_outside_the_vocabulary_in_a_tampered_store_are_named() {
    let (dir, cfg) = setup();
    // A store without checksums (prepared by an older mlm) is still checked.
    let manifest = dir.path().join("out/data/manifest.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("checksums").is_some());
    std::fs::write(&manifest, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    tamper_store(dir.path(), |b| {
        for w in b.chunks_exact_mut(4).step_by(3) {
            w.copy_from_slice(&4_000_000u32.to_le_bytes());
        }
    });
    fails(
        dir.path(),
        &["train"],
        &cfg,
        &[
            "--set",
            "training.max_steps=8",
            "--set",
            "checkpoint.allow_config_change=true",
            "--set",
            "eval.at_start=false",
        ],
        &["token id 4000000", "outside the model's vocabulary", "data"],
    );
}

#[test]
fn out_of_memory_is_one_clear_error() {
    // A 3 GB address-space limit, and a dense vocabulary projection of
    // 256 x 64 positions x 30522 tokens (2 GB of logits, and as much again for
    // their log-softmax): the first micro-batch cannot allocate. The run stops
    // with one line naming the step and its sizes and saying what to change,
    // and writes no checkpoint.
    let (dir, cfg) = setup();
    let out = dir.path().join("oom");
    let o = run(std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000; exec {:?} train {:?} --set training.batch_size=512 --set training.micro_batch_size=256 \
         --set training.sparse_head=false \
         --set training.max_steps=8 --set eval.at_start=false --set logging.progress=never \
         --set training.output_dir={:?}",
            env!("CARGO_BIN_EXE_mlm"),
            cfg,
            out
        ))
        // As a developer's shell often has it: still no panic or C++ frames.
        .env("RUST_BACKTRACE", "1"));
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "{stderr}");
    assert!(!stderr.contains("frame #") && !stderr.contains("stack backtrace"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let e = errors[0];
    assert!(e.contains("out of memory at step 1 (batch 512, micro-batch 256, block 64)"), "{e}");
    assert!(e.contains("training.micro_batch_size to 128 or less") && e.contains("\"auto\""), "{e}");
    assert!(e.contains("training.activation_checkpointing = true") && e.contains("data.block_size"), "{e}");
    let written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("checkpoint") || n == "best")
        .collect();
    assert!(written.is_empty(), "{written:?}");
}
