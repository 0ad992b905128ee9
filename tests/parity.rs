//! Parity with Hugging Face `transformers`: logits of small random-init models,
//! the directories we write loading cleanly in `AutoModelForMaskedLM`, and a real
//! pretrained `BertModel` checkpoint loading with the MLM head reported missing.
//!
//! The reference models and logits are made by `tests/python/make_models.py`
//! (run once per test process) with `$MLM_PYTHON`, falling back to
//! `$HOME/.cache/mlm/venv/bin/python`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mlm::model::MaskedLm;
use tch::{Device, Kind, Tensor};

/// fp32 logits must agree with transformers to this max absolute difference.
const TOL: f64 = 1e-4;

fn python() -> PathBuf {
    std::env::var_os("MLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mlm/venv/bin/python")
        })
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

fn run_python(args: &[&Path]) {
    let out = Command::new(python())
        .args(args)
        .output()
        .expect("running the Python reference");
    assert!(
        out.status.success(),
        "{} {:?} failed:\n{}",
        python().display(),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The folder made by `make_models.py`: `bert/`, `distilbert/`, `bert_bin/`,
/// `reference.safetensors`, `minilm_dir.txt`.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parity-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        run_python(&[&script("make_models.py"), &dir]);
        dir
    })
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn reference(name: &str) -> Tensor {
    let (_, t) = read(&fixture().join("reference.safetensors"))
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not in reference.safetensors"));
    t
}

/// Max |a - b| over the non-pad positions and over all positions.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size());
    let per_pos = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .amax(-1, false); // [b, s]
    let tokens = reference("attention_mask").ne(0);
    let non_pad = per_pos.masked_select(&tokens).max().double_value(&[]);
    (non_pad, per_pos.max().double_value(&[]))
}

fn our_logits(model: &MaskedLm) -> Tensor {
    tch::no_grad(|| model.logits(&reference("input_ids"), &reference("attention_mask"), false))
}

fn load_clean(dir: &Path) -> MaskedLm {
    let (model, report) = MaskedLm::load_dir(dir, Device::Cpu).unwrap();
    assert!(
        report.missing.is_empty() && report.unexpected.is_empty(),
        "{}: {report:?}",
        dir.display()
    );
    model
}

fn logits_match_transformers(arch: &str) {
    let model = load_clean(&fixture().join(arch));
    let (non_pad, all) = max_abs_diff(&our_logits(&model), &reference(&format!("{arch}_logits")));
    println!("{arch}: max abs diff vs transformers: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL, "{arch}: {non_pad} / {all}");
}

/// save_dir writes what save_pretrained writes, and transformers loads it cleanly
/// with the same logits.
fn saved_dir_loads_cleanly_in_transformers(arch: &str) {
    let model = load_clean(&fixture().join(arch));
    let out = tempfile::tempdir().unwrap();
    model.save_dir(out.path()).unwrap();

    let names = |p: &Path| {
        let mut n: Vec<String> = read(p).into_iter().map(|(n, _)| n).collect();
        n.sort();
        n
    };
    let ours = out.path().join("model.safetensors");
    assert_eq!(
        names(&ours),
        names(&fixture().join(arch).join("model.safetensors"))
    );
    assert!(read(&ours).iter().all(|(_, t)| t.kind() == Kind::Float));

    let hf_logits = out.path().join("hf_logits.safetensors");
    run_python(&[
        &script("check_load.py"),
        out.path(),
        &fixture().join("reference.safetensors"),
        &hf_logits,
    ]);
    let (_, hf) = read(&hf_logits).remove(0);
    let (non_pad, all) = max_abs_diff(&our_logits(&model), &hf);
    println!("{arch}: saved dir, transformers vs ours: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL, "{arch}: {non_pad} / {all}");
}

#[test]
fn bert_logits_match_transformers() {
    logits_match_transformers("bert");
}

#[test]
fn distilbert_logits_match_transformers() {
    logits_match_transformers("distilbert");
}

#[test]
fn bert_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("bert");
}

#[test]
fn distilbert_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("distilbert");
}

#[test]
fn pytorch_model_bin_loads_like_safetensors() {
    let model = load_clean(&fixture().join("bert_bin"));
    let (non_pad, all) = max_abs_diff(&our_logits(&model), &reference("bert_logits"));
    println!("bert from pytorch_model.bin: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL);
}

#[test]
fn minilm_base_model_loads_with_head_missing_and_pooler_unexpected() {
    let dir = PathBuf::from(
        std::fs::read_to_string(fixture().join("minilm_dir.txt"))
            .unwrap()
            .trim(),
    );
    let (model, report) = MaskedLm::load_dir(&dir, Device::Cpu).unwrap();
    assert_eq!(
        report.missing,
        [
            "cls.predictions.bias",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
        ]
    );
    assert_eq!(
        report.unexpected,
        ["pooler.dense.bias", "pooler.dense.weight"]
    );
    let hidden = tch::no_grad(|| {
        model.forward_hidden(&reference("input_ids"), &reference("attention_mask"), false)
    });
    let (non_pad, all) = max_abs_diff(&hidden, &reference("minilm_hidden"));
    println!("MiniLM last_hidden_state: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL);
}

#[test]
fn random_init_from_config_saves_a_dir_transformers_loads() {
    let model =
        MaskedLm::from_config_file(&fixture().join("distilbert/config.json"), Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_dir(out.path()).unwrap();
    let hf_logits = out.path().join("hf_logits.safetensors");
    run_python(&[
        &script("check_load.py"),
        out.path(),
        &fixture().join("reference.safetensors"),
        &hf_logits,
    ]);
    let (_, hf) = read(&hf_logits).remove(0);
    let (non_pad, _) = max_abs_diff(&our_logits(&model), &hf);
    assert!(non_pad < TOL, "{non_pad}");
}

#[test]
fn bf16_copies_run_forward_close_to_fp32() {
    for arch in ["bert", "distilbert"] {
        let model = load_clean(&fixture().join(arch));
        let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
        assert!(bf16
            .vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::BFloat16));
        assert!(
            model
                .vs
                .variables()
                .values()
                .all(|t| t.kind() == Kind::Float),
            "master weights untouched"
        );
        let logits = our_logits(&bf16);
        assert_eq!(logits.kind(), Kind::BFloat16);
        let (non_pad, _) = max_abs_diff(&logits, &reference(&format!("{arch}_logits")));
        println!("{arch}: bf16 vs fp32 transformers: {non_pad:.3e}");
        assert!(non_pad < 0.05, "{arch}: bf16 logits off by {non_pad}");
    }
}

#[test]
fn missing_weights_file_error_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("bert/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = MaskedLm::load_dir(dir.path(), Device::Cpu)
        .err()
        .expect("no weights must fail");
    assert!(
        format!("{err:#}").contains(&dir.path().display().to_string()),
        "{err:#}"
    );
}

/// `mlm fill-mask` against HF's fill-mask pipeline on the same directory.
fn fill_mask_matches_pipeline(arch: &str) {
    let dir = fixture().join(arch);
    let text = "The capital of France is [MASK].";
    let ours = Command::new(env!("CARGO_BIN_EXE_mlm"))
        .args(["fill-mask", "--top-k", "5", "--model"])
        .arg(&dir)
        .arg(text)
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
    let ours: Vec<serde_json::Value> =
        String::from_utf8_lossy(&ours.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hf = Command::new(python())
        .arg("-c")
        .arg(
            r#"
import json, sys
from transformers import pipeline
p = pipeline("fill-mask", model=sys.argv[1], tokenizer=sys.argv[1], device="cpu")
for r in p(sys.argv[2], top_k=5):
    print(json.dumps(r))
"#,
        )
        .arg(&dir)
        .arg(text)
        .output()
        .unwrap();
    assert!(hf.status.success(), "{}", String::from_utf8_lossy(&hf.stderr));
    let hf: Vec<serde_json::Value> =
        String::from_utf8_lossy(&hf.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(ours.len(), 5);
    assert_eq!(hf.len(), 5);
    for (o, h) in ours.iter().zip(&hf) {
        assert_eq!(o["token"], h["token"], "ours {o} vs HF {h}");
        assert_eq!(o["token_str"], h["token_str"], "ours {o} vs HF {h}");
        assert_eq!(o["sequence"], h["sequence"], "ours {o} vs HF {h}");
        let (so, sh) = (o["score"].as_f64().unwrap(), h["score"].as_f64().unwrap());
        assert!((so - sh).abs() < 1e-4, "score {so} vs {sh}");
    }
}

#[test]
fn bert_fill_mask_matches_transformers_pipeline() {
    fill_mask_matches_pipeline("bert");
}

#[test]
fn distilbert_fill_mask_matches_transformers_pipeline() {
    fill_mask_matches_pipeline("distilbert");
}
