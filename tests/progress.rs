//! A job whose stderr is a file (nohup, Slurm) still shows its progress: one
//! line every `logging.progress_every_s` for tokenizing, training and each
//! evaluation, and each evaluation says how long it took.
use crate::common::*;

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    // The test's stderr is a pipe: no bar can be drawn there.
    let out = run(mlm().arg("train").arg(&cfg).args([
        "--set",
        "training.max_steps=6",
        "--set",
        "logging.progress=auto",
        "--set",
        // 0: a line at every update, so which lines appear does not depend on the clock.
        "logging.progress_every_s=0",
    ]));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "tokenizing: ",
        " MiB of ",
        "train: 3 of 6 (50%), ",
        "train: 6 of 6 (100%), ",
        "evaluation at step 0: 1 of ",
        "evaluation at step 6: ",
        "evaluated ",
    ] {
        assert!(stderr.contains(want), "no {want:?} in:\n{stderr}");
    }
    let eval_line = stderr.lines().find(|l| l.contains("evaluated ")).unwrap();
    assert!(eval_line.contains("held-out blocks") && eval_line.contains(" s"), "{eval_line}");

    // "never" shows none of it.
    let quiet = tempfile::tempdir().unwrap();
    let cfg = write_job(quiet.path(), "");
    let out =
        run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=2", "--set", "logging.progress=never"]));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("train: ") && !stderr.contains("tokenizing: "), "{stderr}");
}
