//! `benches/gpu.sh`, the GPU acceptance script, dry-run on the CPU
//! (`MLM_BENCH_DEVICE=cpu`: every stage's logic on tiny models). A session lent a
//! GPU runs it once, in one device call whose limits it must keep: a stage past
//! its limit is killed with everything it started, a stage that would end past the
//! deadline is skipped, and `$OUT` holds at most 8 files of at most 16 MiB, named in
//! letters, digits, '.', '_' and '-', refreshed after every stage: the summary and
//! one archive of the logs, never a checkpoint.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{process_dir, python};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/gpu.sh")
}

/// `benches/gpu.sh bundle` of this build's binaries (`MLM_GPU_BIN_DIR`: no
/// release build), once per test binary.
fn bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let bins = Path::new(env!("CARGO_BIN_EXE_mlm")).parent().unwrap().to_path_buf();
        assert!(
            bins.join("mlm-launch").is_file(),
            "no mlm-launch in {}: `cargo build --workspace --bins`",
            bins.display()
        );
        let dir = process_dir("gpu-dryrun-bundle");
        let out = Command::new("bash")
            .arg(script())
            .arg("bundle")
            .env("MLM_GPU_BIN_DIR", &bins)
            .env("MLM_GPU_BUNDLE_DIR", &dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "bundle failed:\n{}{}", text(&out.stdout), text(&out.stderr));
        let build = std::fs::read_to_string(dir.join("BUILD.txt")).unwrap();
        assert!(build.contains("commit") && build.contains("dirty_files") && build.contains("torch"), "{build}");
        dir
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One dry run in `dir` (run folder and `$OUT` inside it), with `env` on top of
/// the common settings; returns its output and wall time. Runs one at a time:
/// they time themselves against their limits on a machine of two cores.
fn dry_run(dir: &Path, env: &[(&str, &str)]) -> (Output, Duration) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .env("MLM_BENCH_DEVICE", "cpu")
        .env("MLM_GPU_PYTHON", python())
        .env("MLM_GPU_BUNDLE_DIR", bundle())
        .env("MLM_GPU_RUN_DIR", dir.join("run"))
        .env("MLM_GPU_THREADS", "1")
        .env("OUT", dir.join("out"))
        .env_remove("MLM_GPU_STAGES")
        .env_remove("MLM_GPU_STALL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().unwrap();
    let took = t0.elapsed();
    eprintln!("--- dry run {env:?} ({:.0} s):\n{}{}", took.as_secs_f64(), text(&out.stdout), text(&out.stderr));
    (out, took)
}

/// The summary's line for a stage.
fn stage_line<'a>(summary: &'a str, stage: &str) -> &'a str {
    let prefix = format!(" {stage}: ");
    summary
        .lines()
        .find(|l| l.starts_with("stage ") && l.contains(&prefix))
        .unwrap_or_else(|| panic!("no line for stage {stage}:\n{summary}"))
}

/// What a device call would bring back: at most 8 files, each under 16 MiB,
/// names the tool accepts, the summary and an archive without checkpoints,
/// token stores or weights.
fn check_out(out: &Path) -> String {
    let files: Vec<_> = std::fs::read_dir(out).unwrap().flatten().collect();
    assert!(files.len() <= 8, "{} files in $OUT", files.len());
    for f in &files {
        let name = f.file_name().to_string_lossy().into_owned();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)), "file name {name:?}");
        let meta = f.metadata().unwrap();
        assert!(meta.is_file(), "{name} is not a plain file");
        assert!(meta.len() < 16 << 20, "{name}: {} bytes", meta.len());
    }
    let summary = std::fs::read_to_string(out.join("summary.txt")).expect("$OUT/summary.txt");
    let list = Command::new("tar").arg("-tzf").arg(out.join("gpu-run.tgz")).output().unwrap();
    assert!(list.status.success(), "{}", text(&list.stderr));
    let listing = text(&list.stdout);
    for bad in ["checkpoint", ".safetensors", "prepared", "optimizer", "tokenizer.json"] {
        assert!(!listing.contains(bad), "the archive holds {bad}:\n{listing}");
    }
    assert!(listing.contains("summary.txt"), "{listing}");
    summary
}

/// No process of the run is left: the stall, trainers, samplers (their command
/// lines name the run's folder or the bundle's binaries under it).
fn assert_nothing_left(dir: &Path) {
    let left = Command::new("pgrep").arg("-af").arg(dir.to_str().unwrap()).output().unwrap();
    let left = text(&left.stdout);
    assert!(left.trim().is_empty(), "processes left running:\n{left}");
}

#[test]
fn a_stage_past_its_limit_is_killed_and_the_deadline_skips_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // doctor (limit 15 s) sleeps far longer; 40 s leave no room for nccl (25 s) after it.
    let (out, took) = dry_run(dir.path(), &[("MLM_GPU_DEADLINE_S", "40"), ("MLM_GPU_STALL", "doctor:600")]);
    assert!(!out.status.success(), "a stage failed: the script must fail");
    let summary = check_out(&dir.path().join("out"));
    // Before it, preflight ran (its own limit bounds it on a busy machine).
    let preflight = stage_line(&summary, "preflight");
    assert!(preflight.contains("PASS") || preflight.contains("FAIL"), "{summary}");
    let doctor = stage_line(&summary, "doctor");
    assert!(doctor.contains("FAIL") && doctor.contains("killed"), "{summary}");
    for later in ["nccl", "parity", "resume", "overlap", "memory", "speed"] {
        assert!(stage_line(&summary, later).contains("SKIPPED (deadline"), "{later}:\n{summary}");
    }
    assert!(took < Duration::from_secs(40 + 20), "the run took {took:?} for a 40 s deadline");
    assert!(text(&out.stdout).contains("===== summary"), "the summary is printed at the end");
    assert_nothing_left(dir.path());
}

#[test]
fn every_stage_a_cpu_can_run_passes_in_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    // Twice the GPU limits: this machine is slower and shared.
    let (out, _) = dry_run(dir.path(), &[("MLM_GPU_DEADLINE_S", "900"), ("MLM_GPU_LIMIT_SCALE", "2")]);
    let summary = check_out(&dir.path().join("out"));
    assert!(out.status.success(), "{summary}");
    for stage in ["preflight", "doctor", "parity", "resume", "overlap", "memory", "speed"] {
        assert!(stage_line(&summary, stage).contains(": PASS ("), "{stage}:\n{summary}");
    }
    assert!(stage_line(&summary, "nccl").contains("NO GPU"), "{summary}");
    for what in [
        "resumed vs uninterrupted",
        "2 workers x 8 vs 1 x 16",
        "estimate-memory:",
        "tokens/s",
        "where a step's time goes",
    ] {
        assert!(summary.contains(what), "no {what:?} in the summary:\n{summary}");
    }
    assert_nothing_left(dir.path());
}
