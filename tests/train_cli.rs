//! End-to-end: the real `mlm` and `mlm-launch` binaries train a small model on real
//! text, and what they write is a Hugging Face model.
use crate::common::*;

#[test]
fn training_lowers_held_out_perplexity_and_writes_hf_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "[checkpoint]\nkeep_last = 1\n");
    let out = run(mlm().arg("train").arg(&cfg));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("perplexity after"), "{stdout}");

    let run_dir = dir.path().join("out");
    let evals = eval_records(&run_dir.join("metrics.jsonl"));
    let first = evals.first().unwrap()["perplexity"].as_f64().unwrap();
    let last = evals.last().unwrap()["perplexity"].as_f64().unwrap();
    // The held-out loss falls, not only the training loss.
    assert!(last < 0.5 * first, "held-out perplexity {first} -> {last}");

    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(run_dir.join("best").join(f).is_file(), "best/{f}");
        assert!(run_dir.join("checkpoint-30").join(f).is_file(), "checkpoint-30/{f}");
    }
    for f in ["optimizer.safetensors", "trainer_state.json", "checksums.json"] {
        assert!(run_dir.join("checkpoint-30").join(f).is_file(), "checkpoint-30/{f}");
    }
    // keep_last = 1: only the newest step checkpoint remains.
    let ckpts: Vec<_> = std::fs::read_dir(&run_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1);

    // transformers loads the best model with no missing or unexpected keys.
    let py = run(std::process::Command::new(python()).arg("-c").arg(format!(
        r#"
from transformers import AutoModelForMaskedLM
m, info = AutoModelForMaskedLM.from_pretrained({:?}, output_loading_info=True)
assert not info["missing_keys"] and not info["unexpected_keys"], info
print(type(m).__name__)
"#,
        run_dir.join("best").display().to_string()
    )));
    assert!(py.status.success());
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "BertForMaskedLM");

    // The trained model answers fill-mask and eval from the command line.
    let fm = run(mlm()
        .args(["fill-mask", "--top-k", "3", "--model"])
        .arg(run_dir.join("best"))
        .arg("The [MASK] statement."));
    assert!(fm.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&fm.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for k in ["score", "token", "token_str", "sequence"] {
        assert!(lines[0].get(k).is_some(), "{k} missing in {}", lines[0]);
    }
    let ev = run(mlm()
        .args(["eval", "--block-size", "64", "--model"])
        .arg(run_dir.join("best"))
        .arg("--data")
        .arg(corpus_glob()));
    assert!(ev.status.success());
    let v: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    assert!(v["perplexity"].as_f64().unwrap().is_finite());
}

#[test]
fn launcher_prepares_then_trains_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    // `make test` builds the workspace's binaries first: the launcher sits beside `mlm`.
    let out = run(std::process::Command::new(launcher())
        .arg(&cfg)
        .args(["--set", "training.max_steps=4", "--set", "eval.at_start=false", "--device", "cpu"])
        .arg("--mlm")
        .arg(env!("CARGO_BIN_EXE_mlm")));
    assert!(out.status.success());
    assert!(dir.path().join("out/checkpoint-4/model.safetensors").is_file());
    assert!(dir.path().join("out/data/manifest.json").is_file());
}

#[test]
fn gradient_accumulation_equals_one_larger_batch() {
    // Without dropout, 2 micro-batches of 8 per step must give the weights of one
    // batch of 16: the loss is normalised by the masked tokens of the whole step.
    let no_dropout = "[eval]\nat_start = false\n";
    let runs: Vec<Vec<(String, Vec<f32>)>> = [(16, 1), (8, 2)]
        .iter()
        .map(|(batch, accum)| {
            let dir = tempfile::tempdir().unwrap();
            let cfg = write_job(dir.path(), "");
            let model = dir.path().join("tiny-bert.json");
            let text = std::fs::read_to_string(&model).unwrap().replace("_dropout_prob\": 0.1", "_dropout_prob\": 0.0");
            std::fs::write(&model, text).unwrap();
            let text = std::fs::read_to_string(&cfg).unwrap().replace("[eval]\n", no_dropout);
            std::fs::write(&cfg, text).unwrap();
            let out = run(mlm().arg("train").arg(&cfg).args([
                "--set",
                "training.max_steps=5",
                "--set",
                &format!("training.batch_size={batch}"),
                "--set",
                &format!("training.grad_accum_steps={accum}"),
            ]));
            assert!(out.status.success());
            weights(&dir.path().join("out/checkpoint-5"))
        })
        .collect();
    let worst = worst_relative_difference(&runs[0], &runs[1]);
    assert!(worst.0 < 1e-5, "largest relative difference {} in {}", worst.0, worst.1);
}

#[test]
fn bf16_training_lowers_held_out_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path(), "");
    let out = run(mlm().arg("train").arg(&cfg).args(["--set", "training.precision=bf16"]));
    assert!(out.status.success());
    let evals = eval_records(&dir.path().join("out/metrics.jsonl"));
    let first = evals.first().unwrap()["perplexity"].as_f64().unwrap();
    let last = evals.last().unwrap()["perplexity"].as_f64().unwrap();
    assert!(last < 0.5 * first, "bf16 held-out perplexity {first} -> {last}");
    // the saved weights are the fp32 master weights
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/best/config.json")).unwrap()).unwrap();
    assert_ne!(cfg_json["torch_dtype"], "bfloat16");
    assert_ne!(cfg_json["dtype"], "bfloat16");
}

#[test]
fn bf16_tracks_fp32_on_the_demo_corpus() {
    // 200 steps on the demo's corpus: the held-out loss of bf16 compute must be
    // within 2% of fp32's.
    let files = r#"data.files=["/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt", "/usr/share/doc/python3.11/html/_sources/faq/*.rst.txt"]"#;
    let final_loss = |precision: &str| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_job(dir.path(), "");
        let out = run(mlm().arg("train").arg(&cfg).args([
            "--set",
            files,
            "--set",
            "training.max_steps=200",
            "--set",
            "training.lr=1e-3",
            "--set",
            "eval.at_start=false",
            "--set",
            &format!("training.precision={precision}"),
        ]));
        assert!(out.status.success());
        eval_records(&dir.path().join("out/metrics.jsonl")).last().unwrap()["eval_loss"].as_f64().unwrap()
    };
    let (fp32, bf16) = (final_loss("fp32"), final_loss("bf16"));
    eprintln!("held-out loss after 200 steps: fp32 {fp32:.4}, bf16 {bf16:.4}");
    assert!((bf16 - fp32).abs() / fp32 < 0.02, "fp32 {fp32} vs bf16 {bf16}");
}

#[test]
fn fresh_head_of_a_base_checkpoint_is_drawn_from_the_job_seed() {
    // Every worker of a data-parallel job loads the model itself: the MLM head a
    // BertModel checkpoint lacks must come out the same on each.
    let cfg = mlm::config::Config::from_toml(&format!("[model]\npath = {:?}\n", minilm_dir())).unwrap();
    // Seeds and draws from libtorch's generator: no other test of this process may draw meanwhile.
    let _rng = torch_rng();
    let head = |cfg: &mlm::config::Config| {
        let loaded = mlm::model::load::load_model(cfg, tch::Device::Cpu).unwrap();
        assert!(loaded.fresh_head, "a BertModel checkpoint has no MLM head");
        loaded.model.vs.variables()["cls.predictions.transform.dense.weight"].copy()
    };
    let (a, b) = (head(&cfg), head(&cfg));
    assert!(a.equal(&b), "two loads with one seed differ");
    let mut other = cfg.clone();
    other.training.seed += 1;
    assert!(!a.equal(&head(&other)), "the seed does not reach the fresh head");
}
