//! Bad input gets one clear line naming the problem and a non-zero exit, never a
//! panic, and never touches what a job already wrote: every case runs against an
//! output directory holding a finished checkpoint, `best/` and prepared data, and
//! checks afterwards that all of it is byte for byte as before.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::common::*;

/// An output directory of a finished 4-step job (made once per test run).
pub(crate) fn trained_output() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir("bad-input-fixture");
        let cfg = write_job(&dir, "");
        let ok = run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=4"])).status.success();
        assert!(ok, "fixture job failed");
        dir.join("out")
    })
}

pub(crate) fn copy_tree(from: &Path, to: &Path) {
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
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
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
pub(crate) fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    copy_tree(trained_output(), &dir.path().join("out"));
    (dir, cfg)
}

/// Runs `mlm <args> <cfg> <after>`, expecting one error line that contains every
/// string of `expect`, and the output directory unchanged. The job's config
/// differs from the finished run's (at least in max_steps): the resume is
/// allowed to go on, so that the bad input itself is what fails.
pub(crate) fn fails(dir: &Path, args: &[&str], cfg: &Path, after: &[&str], expect: &[&str]) {
    let allow = ["--set", "checkpoint.allow_config_change=true"];
    fails_resuming(dir, args, cfg, &[after, &allow].concat(), expect)
}

/// [`fails`] without allowing a changed config: for the refusals of a resume.
pub(crate) fn fails_resuming(dir: &Path, args: &[&str], cfg: &Path, after: &[&str], expect: &[&str]) {
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

pub(crate) fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from:?} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

pub(crate) fn set_files(cfg: &Path, files: &str) {
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
pub(crate) fn fails_cmd(cmd: &mut std::process::Command, expect: &[&str]) {
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
