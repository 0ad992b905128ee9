//! Parity with Hugging Face `transformers`: logits and gradients of small
//! random-init BERT, DistilBERT, RoBERTa, CamemBERT and DeBERTa-v2/v3 models, the directories
//! we write loading cleanly in `AutoModelForMaskedLM`, `mlm fill-mask` against the
//! fill-mask pipeline, and a real pretrained `BertModel` checkpoint loading with
//! the MLM head reported missing.
//!
//! The reference models and logits are made by `tests/python/make_models.py`
//! (run once per test process) with `$MLM_PYTHON`, falling back to
//! `$HOME/.cache/mlm/venv/bin/python`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mlm::model::MaskedLm;
use tch::{Device, Kind, Reduction, Tensor};

use crate::common::parity::{assert_grads_match, load_clean, read_tensors, run_script, tensor_in};
use crate::common::{process_dir, torch_rng};

/// fp32 logits must agree with transformers to this max absolute difference.
const TOL: f64 = 1e-4;
/// fp32 gradients: ||ours - HF|| / ||HF|| per parameter, and max |ours - HF|.
const GRAD_TOL: f64 = 1e-4;

/// The folder made by `make_models.py`: `bert/`, `distilbert/`, `bert_bin/`,
/// `roberta/`, `camembert/`, `deberta/`, `deberta_lm/`, `deberta_abs/`, `deberta_conv/`, `grads/`,
/// `reference.safetensors`, `minilm_dir.txt`.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir("parity-fixture");
        run_script("make_models.py", &[&dir]);
        dir
    })
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    read_tensors(path)
}

fn reference(name: &str) -> Tensor {
    tensor_in(&fixture().join("reference.safetensors"), name)
}

/// The reference batch a fixture directory runs on: its key prefix in
/// `reference.safetensors` (`{prefix}input_ids`, `attention_mask`, `labels`).
fn batch_prefix(arch: &str) -> &'static str {
    match arch {
        "roberta" | "camembert" => "roberta_",
        a if a.starts_with("deberta") => "deberta_",
        _ => "",
    }
}

fn batch(arch: &str, what: &str) -> Tensor {
    reference(&format!("{}{what}", batch_prefix(arch)))
}

/// The reference logits of a fixture (`deberta_lm` holds `deberta`'s weights).
fn reference_logits(arch: &str) -> Tensor {
    match arch {
        "deberta_lm" => reference("deberta_logits"),
        "bert_bin" => reference("bert_logits"),
        a => reference(&format!("{a}_logits")),
    }
}

/// Max |a - b| over the non-pad positions and over all positions of `arch`'s batch.
fn max_abs_diff_on(arch: &str, a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.size(), b.size());
    let per_pos = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().amax(-1, false); // [b, s]
    let tokens = batch(arch, "attention_mask").ne(0);
    let non_pad = per_pos.masked_select(&tokens).max().double_value(&[]);
    (non_pad, per_pos.max().double_value(&[]))
}

/// [`max_abs_diff_on`] the BERT batch.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    max_abs_diff_on("bert", a, b)
}

fn our_logits(model: &MaskedLm) -> Tensor {
    our_logits_on("bert", model)
}

fn our_logits_on(arch: &str, model: &MaskedLm) -> Tensor {
    tch::no_grad(|| model.logits(&batch(arch, "input_ids"), Some(&batch(arch, "attention_mask")), false))
}

/// `MaskedLm::load_dir` on the CPU, holding [`torch_rng`].
fn load_dir(dir: &Path) -> anyhow::Result<(MaskedLm, mlm::model::LoadReport)> {
    let _rng = torch_rng();
    MaskedLm::load_dir(dir, Device::Cpu)
}

fn logits_match_transformers(arch: &str) {
    let model = load_clean(&fixture().join(arch));
    let (non_pad, all) = max_abs_diff_on(arch, &our_logits_on(arch, &model), &reference_logits(arch));
    println!("{arch}: max abs diff vs transformers: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL, "{arch}: {non_pad} / {all}");
}

/// The directories `save_dir` writes, checked by transformers in one Python
/// process (`check_load.py --jobs`): `saved/{name}/` holds our save and
/// `hf_logits.safetensors` (transformers' logits on the fixture's batch), or
/// `hf_logits.safetensors.error` with what transformers reported.
/// `random_init` is a DistilBERT made from `distilbert/config.json` alone.
fn saved_dirs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = fixture().join("saved");
        let mut jobs = Vec::new();
        for name in
            ["bert", "distilbert", "roberta", "camembert", "deberta", "deberta_lm", "deberta_conv", "random_init"]
        {
            let model = if name == "random_init" {
                let _rng = torch_rng();
                MaskedLm::from_config_file(&fixture().join("distilbert/config.json"), Device::Cpu).unwrap()
            } else {
                load_clean(&fixture().join(name))
            };
            let out = dir.join(name);
            model.save_dir(&out).unwrap();
            let logits = out.join("hf_logits.safetensors");
            jobs.push(serde_json::json!([out, logits, batch_prefix(name)]));
        }
        let jobs_file = dir.join("jobs.json");
        std::fs::write(&jobs_file, serde_json::Value::from(jobs).to_string()).unwrap();
        run_script("check_load.py", &[Path::new("--jobs"), &jobs_file, &fixture().join("reference.safetensors")]);
        dir
    })
}

/// save_dir writes what save_pretrained writes, transformers loads it with no
/// missing or unexpected keys, and its logits equal ours (read back from that dir).
fn saved_dir_loads_cleanly_in_transformers(arch: &str) {
    saved_dir_loads_cleanly_in_transformers_as(arch, arch)
}

/// As above, for a fixture whose head layout (`deberta_lm`) differs from the one
/// transformers writes by default: the names must equal those of `default_layout`.
fn saved_dir_loads_cleanly_in_transformers_as(arch: &str, default_layout: &str) {
    let out = saved_dirs().join(arch);
    let names = |p: &Path| {
        let mut n: Vec<String> = read(p).into_iter().map(|(n, _)| n).collect();
        n.sort();
        n
    };
    let ours = out.join("model.safetensors");
    assert_eq!(names(&ours), names(&fixture().join(default_layout).join("model.safetensors")));
    assert!(read(&ours).iter().all(|(_, t)| t.kind() == Kind::Float));
    let hf = hf_logits_of_saved(arch);
    let model = load_clean(&out);
    let (non_pad, all) = max_abs_diff_on(arch, &our_logits_on(arch, &model), &hf);
    println!("{arch}: saved dir, transformers vs ours: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL, "{arch}: {non_pad} / {all}");
}

fn hf_logits_of_saved(name: &str) -> Tensor {
    let path = saved_dirs().join(name).join("hf_logits.safetensors");
    let error = path.with_extension("safetensors.error");
    if let Ok(msg) = std::fs::read_to_string(&error) {
        panic!("transformers could not load our {name} dir: {msg}");
    }
    read(&path).remove(0).1
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
fn roberta_logits_match_transformers() {
    logits_match_transformers("roberta");
}

#[test]
fn camembert_logits_match_transformers() {
    logits_match_transformers("camembert");
}

#[test]
fn camembert_gradients_match_transformers() {
    grads_match_transformers("camembert");
}

#[test]
fn camembert_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("camembert");
    let config = saved_dirs().join("camembert/config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    assert_eq!(
        (config["model_type"].as_str(), config["architectures"][0].as_str()),
        (Some("camembert"), Some("CamembertForMaskedLM"))
    );
}

#[test]
fn deberta_v3_logits_match_transformers() {
    logits_match_transformers("deberta");
}

/// DeBERTa-v3 checkpoints name the head `lm_predictions.lm_head.*`.
#[test]
fn deberta_lm_predictions_layout_loads_with_the_same_logits() {
    logits_match_transformers("deberta_lm");
}

/// Absolute positions, c2p only with its own `pos_key_proj`, unbucketed relative
/// positions, token types and `embed_proj`.
#[test]
fn deberta_v2_variant_logits_match_transformers() {
    logits_match_transformers("deberta_abs");
}

/// The masked loss of `make_models.py` (cross-entropy mean over the labelled
/// positions, eval mode), backward, and each parameter's gradient against HF's.
fn grads_match_transformers(arch: &str) {
    let model = load_clean(&fixture().join(arch));
    let logits = model.logits(&batch(arch, "input_ids"), Some(&batch(arch, "attention_mask")), false);
    let loss = logits.to_kind(Kind::Float).view([-1, model.vocab_size()]).cross_entropy_loss::<Tensor>(
        &batch(arch, "labels").view([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    );
    loss.backward();
    let reference = read(&fixture().join("grads").join(format!("{arch}.safetensors")));
    assert_grads_match(arch, &model.vs.variables(), &reference, GRAD_TOL);
}

#[test]
fn bert_gradients_match_transformers() {
    grads_match_transformers("bert");
}

#[test]
fn distilbert_gradients_match_transformers() {
    grads_match_transformers("distilbert");
}

#[test]
fn roberta_gradients_match_transformers() {
    grads_match_transformers("roberta");
}

#[test]
fn deberta_v3_gradients_match_transformers() {
    grads_match_transformers("deberta");
}

#[test]
fn deberta_v2_variant_gradients_match_transformers() {
    grads_match_transformers("deberta_abs");
}

#[test]
fn roberta_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("roberta");
}

#[test]
fn deberta_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("deberta");
}

/// Loaded from the `lm_predictions` layout, saved in the default one (`legacy: true`).
#[test]
fn deberta_lm_predictions_layout_saves_in_the_default_layout() {
    saved_dir_loads_cleanly_in_transformers_as("deberta_lm", "deberta");
    let config = saved_dirs().join("deberta_lm/config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    assert_eq!(config["legacy"], true);
}

#[test]
fn roberta_max_positions_excludes_the_padding_offset() {
    let model = load_clean(&fixture().join("roberta"));
    // max_position_embeddings 64, pad_token_id 1: positions 2..=63.
    assert_eq!(model.max_positions(), 62);
}

/// deberta-v2-xlarge's convolution after the first layer (`make_models.py`).
#[test]
fn deberta_v2_convolution_logits_match_transformers() {
    logits_match_transformers("deberta_conv");
}

#[test]
fn deberta_v2_convolution_gradients_match_transformers() {
    grads_match_transformers("deberta_conv");
}

#[test]
fn deberta_v2_convolution_saved_dir_loads_in_transformers_without_missing_keys() {
    saved_dir_loads_cleanly_in_transformers("deberta_conv");
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
    let dir = PathBuf::from(std::fs::read_to_string(fixture().join("minilm_dir.txt")).unwrap().trim());
    let (model, report) = load_dir(&dir).unwrap();
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
    assert_eq!(report.unexpected, ["pooler.dense.bias", "pooler.dense.weight"]);
    let hidden =
        tch::no_grad(|| model.forward_hidden(&reference("input_ids"), Some(&reference("attention_mask")), false));
    let (non_pad, all) = max_abs_diff(&hidden, &reference("minilm_hidden"));
    println!("MiniLM last_hidden_state: {non_pad:.3e} (non-pad), {all:.3e} (all)");
    assert!(non_pad < TOL && all < TOL);
}

#[test]
fn random_init_from_config_saves_a_dir_transformers_loads() {
    let hf = hf_logits_of_saved("random_init");
    let model = load_clean(&saved_dirs().join("random_init"));
    let (non_pad, _) = max_abs_diff(&our_logits(&model), &hf);
    assert!(non_pad < TOL, "{non_pad}");
}

#[test]
fn bf16_copies_run_forward_close_to_fp32() {
    for arch in ["bert", "distilbert", "roberta", "deberta"] {
        let model = load_clean(&fixture().join(arch));
        let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
        assert!(bf16.vs.variables().values().all(|t| t.kind() == Kind::BFloat16));
        assert!(model.vs.variables().values().all(|t| t.kind() == Kind::Float), "master weights untouched");
        let logits = our_logits_on(arch, &bf16);
        assert_eq!(logits.kind(), Kind::BFloat16);
        let (non_pad, _) = max_abs_diff_on(arch, &logits, &reference_logits(arch));
        println!("{arch}: bf16 vs fp32 transformers: {non_pad:.3e}");
        assert!(non_pad < 0.05, "{arch}: bf16 logits off by {non_pad}");
    }
}

#[test]
fn missing_weights_file_error_names_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture().join("bert/config.json"), dir.path().join("config.json")).unwrap();
    let err = load_dir(dir.path()).err().expect("no weights must fail");
    assert!(format!("{err:#}").contains(&dir.path().display().to_string()), "{err:#}");
}

/// `mlm fill-mask` against HF's fill-mask pipeline on the same directory and
/// text (the pipeline's answer is recorded by `make_models.py`, in
/// `fill_mask/{arch}.jsonl`).
fn fill_mask_matches_pipeline(arch: &str) {
    let dir = fixture().join(arch);
    let text = if arch == "roberta" { "The capital of France is <mask>." } else { "The capital of France is [MASK]." };
    let ours = Command::new(env!("CARGO_BIN_EXE_mlm"))
        .args(["fill-mask", "--top-k", "5", "--model"])
        .arg(&dir)
        .arg(text)
        .output()
        .unwrap();
    assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
    let ours: Vec<serde_json::Value> =
        String::from_utf8_lossy(&ours.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let hf = std::fs::read_to_string(fixture().join("fill_mask").join(format!("{arch}.jsonl"))).unwrap();
    let hf: Vec<serde_json::Value> = hf.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
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

#[test]
fn roberta_fill_mask_matches_transformers_pipeline() {
    fill_mask_matches_pipeline("roberta");
}

#[test]
fn deberta_fill_mask_matches_transformers_pipeline() {
    fill_mask_matches_pipeline("deberta");
}
