//! Parity of ModernBERT with `transformers.ModernBertForMaskedLM` on small
//! random-init models (`tests/python/make_modernbert.py`, run once per test
//! process): blocks of 40 tokens, longer than the 8-token window, with global
//! layers every 2nd and every 3rd layer; logits (padded and full blocks), the
//! masked loss and its gradients, both forms of `config.json`, the directory we
//! save loading in `AutoModelForMaskedLM`, and `mlm fill-mask` against the
//! pipeline.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mlm::model::MaskedLm;
use tch::{Kind, Reduction, Tensor};

use crate::common::parity::{assert_grads_match, load_clean, read_tensors, run_script, tensor_in};
use crate::common::process_dir;

/// fp32 logits and gradients must agree with transformers to this.
const TOL: f64 = 1e-4;

/// The folder `make_modernbert.py` writes.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir("modernbert-fixture");
        run_script("make_modernbert.py", &[&dir]);
        dir
    })
}

fn reference(name: &str) -> Tensor {
    tensor_in(&fixture().join("reference.safetensors"), name)
}

/// Max |a - b| over the padded batch's tokens.
fn max_diff_on_tokens(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let per_pos = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().amax(-1, false);
    per_pos.masked_select(&reference("attention_mask").ne(0)).max().double_value(&[])
}

fn padded_logits(model: &MaskedLm) -> Tensor {
    tch::no_grad(|| model.logits(&reference("input_ids"), Some(&reference("attention_mask")), false))
}

/// The reference logits of a fixture dir (`modernbert_hub` holds `modernbert`'s weights).
fn reference_name(dir: &str) -> &str {
    if dir == "modernbert_hub" {
        "modernbert"
    } else {
        dir
    }
}

#[test]
fn modernbert_logits_match_transformers_on_padded_and_full_blocks() {
    for dir in ["modernbert", "modernbert_hub", "modernbert_bias"] {
        let model = load_clean(&fixture().join(dir));
        let name = reference_name(dir);
        let padded = max_diff_on_tokens(&padded_logits(&model), &reference(&format!("{name}_logits")));
        // A training block: no padding, no mask given.
        let full = tch::no_grad(|| model.logits(&reference("full_input_ids"), None, false));
        let full = (full - reference(&format!("{name}_full_logits"))).abs().max().double_value(&[]);
        println!("{dir}: max abs diff vs transformers: padded {padded:.3e} (tokens), full blocks {full:.3e}");
        assert!(padded < TOL && full < TOL, "{dir}: padded {padded}, full {full}");
    }
}

/// The Hub's `config.json` (`global_attn_every_n_layers`, `*_rope_theta`) and
/// the one transformers 5 writes (`layer_types`, `rope_parameters`) give the
/// same network.
#[test]
fn modernbert_both_config_forms_give_the_same_outputs() {
    let v5 = padded_logits(&load_clean(&fixture().join("modernbert")));
    let hub = padded_logits(&load_clean(&fixture().join("modernbert_hub")));
    let diff = max_diff_on_tokens(&v5, &hub);
    assert!(diff == 0.0, "{diff}");
    // And the pattern matters: all-global layers give other logits.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join("modernbert_hub").join(f), dir.path().join(f)).unwrap();
    }
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["global_attn_every_n_layers"] = 1.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let global = padded_logits(&load_clean(dir.path()));
    assert!(max_diff_on_tokens(&global, &hub) > 1e-3, "the sliding window changed nothing");
}

/// The masked loss (cross-entropy mean over the labelled positions, eval
/// mode) and each parameter's gradient against HF's, on the padded batch.
#[test]
fn modernbert_loss_and_gradients_match_transformers() {
    for dir in ["modernbert", "modernbert_bias"] {
        let model = load_clean(&fixture().join(dir));
        let labels = reference("labels").view([-1]);
        let ce = |logits: &Tensor| {
            logits.to_kind(Kind::Float).view([-1, model.vocab_size()]).cross_entropy_loss::<Tensor>(
                &labels,
                None,
                Reduction::Mean,
                -100,
                0.0,
            )
        };
        let logits = model.logits(&reference("input_ids"), Some(&reference("attention_mask")), false);
        let loss = ce(&logits);
        let hf_loss = ce(&reference(&format!("{dir}_logits"))).double_value(&[]);
        let our_loss = loss.double_value(&[]);
        assert!((our_loss - hf_loss).abs() < TOL, "{dir}: loss {our_loss} vs {hf_loss}");
        println!("{dir}: loss {our_loss:.6} (HF {hf_loss:.6})");
        loss.backward();
        let hf = read_tensors(&fixture().join("grads").join(format!("{dir}.safetensors")));
        assert_grads_match(dir, &model.vs.variables(), &hf, TOL);
    }
}

/// `save_dir` writes what `save_pretrained` writes: transformers loads it with
/// no missing or unexpected keys and its logits equal ours.
#[test]
fn modernbert_saved_dir_loads_in_transformers_without_missing_keys() {
    let saved = fixture().join("saved");
    let mut jobs = Vec::new();
    for dir in ["modernbert_hub", "modernbert_bias"] {
        let out = saved.join(dir);
        load_clean(&fixture().join(dir)).save_dir(&out).unwrap();
        jobs.push(serde_json::json!([out, out.join("hf_logits.safetensors"), ""]));
    }
    let jobs_file = saved.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::Value::from(jobs).to_string()).unwrap();
    run_script("check_load.py", &[Path::new("--jobs"), &jobs_file, &fixture().join("reference.safetensors")]);
    for dir in ["modernbert_hub", "modernbert_bias"] {
        let out = saved.join(dir);
        if let Ok(msg) = std::fs::read_to_string(out.join("hf_logits.safetensors.error")) {
            panic!("transformers could not load our {dir} dir: {msg}");
        }
        let names = |p: &Path| {
            let mut n: Vec<String> = read_tensors(p).into_iter().map(|(n, _)| n).collect();
            n.sort();
            n
        };
        assert_eq!(names(&out.join("model.safetensors")), names(&fixture().join(dir).join("model.safetensors")));
        let hf = read_tensors(&out.join("hf_logits.safetensors")).remove(0).1;
        let diff = max_diff_on_tokens(&padded_logits(&load_clean(&out)), &hf);
        let reference = max_diff_on_tokens(&hf, &reference(&format!("{}_logits", reference_name(dir))));
        println!("{dir}: saved dir, transformers vs ours {diff:.3e}, vs the original {reference:.3e}");
        assert!(diff < TOL && reference < TOL, "{dir}: {diff} / {reference}");
    }
}

#[test]
fn modernbert_bf16_copy_runs_close_to_fp32() {
    let model = load_clean(&fixture().join("modernbert"));
    let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
    let logits = padded_logits(&bf16);
    assert_eq!(logits.kind(), Kind::BFloat16);
    let diff = max_diff_on_tokens(&logits, &reference("modernbert_logits"));
    println!("modernbert: bf16 vs fp32 transformers: {diff:.3e}");
    assert!(diff < 0.05, "bf16 logits off by {diff}");
}

/// `mlm fill-mask` against HF's fill-mask pipeline on the same directory.
#[test]
fn modernbert_fill_mask_matches_transformers_pipeline() {
    let ours = Command::new(env!("CARGO_BIN_EXE_mlm"))
        .args(["fill-mask", "--top-k", "5", "--model"])
        .arg(fixture().join("modernbert"))
        .arg("The capital of France is [MASK].")
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
    let parse =
        |text: &str| -> Vec<serde_json::Value> { text.lines().map(|l| serde_json::from_str(l).unwrap()).collect() };
    let ours = parse(&String::from_utf8_lossy(&ours.stdout));
    let hf = parse(&std::fs::read_to_string(fixture().join("fill_mask/modernbert.jsonl")).unwrap());
    assert_eq!((ours.len(), hf.len()), (5, 5));
    for (o, h) in ours.iter().zip(&hf) {
        assert_eq!((&o["token"], &o["token_str"], &o["sequence"]), (&h["token"], &h["token_str"], &h["sequence"]));
        let (so, sh) = (o["score"].as_f64().unwrap(), h["score"].as_f64().unwrap());
        assert!((so - sh).abs() < 1e-4, "score {so} vs {sh}");
    }
}
