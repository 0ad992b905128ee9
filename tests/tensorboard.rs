//! `logging.tensorboard = true`: the training and evaluation scalars land in
//! `<output_dir>/tb/` as TensorBoard event files, read back here by the
//! `tensorboard` package's own `EventAccumulator`, with the values of
//! `metrics.jsonl`.
use std::process::Command;

use crate::common::*;

#[test]
fn tensorboard_reads_the_scalars_of_metrics_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "tensorboard = true\n");
    let out =
        run(mlm().arg("train").arg(&cfg).args(["--set", "training.max_steps=6", "--set", "training.log_every=2"]));
    assert!(out.status.success());
    let tb = dir.path().join("out/tb");
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
tags = acc.Tags()["scalars"]
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}))
"#;
    let read = Command::new(python()).args(["-c", script]).arg(&tb).output().unwrap();
    assert!(read.status.success(), "EventAccumulator failed: {}", String::from_utf8_lossy(&read.stderr));
    let scalars: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    for tag in
        ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/time_forward_s", "eval/perplexity"]
    {
        assert!(scalars.get(tag).is_some(), "no {tag} in {}", scalars);
    }
    let from_tb: Vec<(u64, f64)> = scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    let from_jsonl = losses(&dir.path().join("out"));
    assert_eq!(from_tb.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 4, 6]);
    for (step, loss) in from_tb {
        let want = from_jsonl[&step];
        assert!(((loss - want) / want).abs() < 1e-6, "step {step}: tensorboard {loss}, metrics.jsonl {want}");
    }
    // The evaluations at the start and at the end, by step.
    let evals: Vec<u64> =
        scalars["eval/perplexity"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert_eq!(evals.first(), Some(&0));
    assert_eq!(evals.last(), Some(&6));
}
