//! Parity of GPT-2 (`src/model/gpt2.rs`) with `transformers.GPT2LMHeadModel`
//! on small random-init models (`tests/python/make_gpt2.py`, run once per
//! process): logits with and without padding, the causal LM loss and every
//! parameter's gradient, a Hub-style `pytorch_model.bin` (a `GPT2Model` state
//! dict without the `transformer.` prefix, with the old mask buffers), and the
//! directories we save loading cleanly in `AutoModelForCausalLM`.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mlm::model::{KvCache, MaskedLm};
use tch::{Kind, Reduction, Tensor};

use crate::common::parity::{assert_grads_match, load_clean, read_tensors, run_script, tensor_in};
use crate::common::process_dir;

/// fp32 logits: max absolute difference.
const TOL: f64 = 1e-4;
/// The loss: relative difference.
const LOSS_TOL: f64 = 1e-5;
/// fp32 gradients: ||ours - HF|| / ||HF|| per parameter, and max |ours - HF|.
const GRAD_TOL: f64 = 1e-4;

/// The folder `make_gpt2.py` writes (its doc lists the layout).
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = process_dir("gpt2-fixture");
        run_script("make_gpt2.py", &[&dir]);
        dir
    })
}

fn reference(name: &str) -> Tensor {
    tensor_in(&fixture().join("reference.safetensors"), name)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max().double_value(&[])
}

/// Our logits without padding and on the right-padded batch (every position).
fn our_logits(model: &MaskedLm) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let plain = model.logits(&reference("input_ids"), None, false);
        let padded = model.logits(&reference("pad_input_ids"), Some(&reference("pad_attention_mask")), false);
        (plain, padded)
    })
}

fn logits_match_transformers(name: &str) {
    let model = load_clean(&fixture().join(name));
    let (plain, padded) = our_logits(&model);
    let plain_diff = max_diff(&plain, &reference(&format!("{name}_logits")));
    let padded_diff = max_diff(&padded, &reference(&format!("{name}_pad_logits")));
    println!("{name}: logits vs transformers: {plain_diff:.3e} (no padding), {padded_diff:.3e} (padded)");
    assert!(plain_diff < TOL && padded_diff < TOL, "{name}: {plain_diff} / {padded_diff}");
}

#[test]
fn gpt2_logits_match_transformers_with_and_without_padding() {
    logits_match_transformers("gpt2");
}

/// `n_inner` set, `scale_attn_weights: false`, exact GELU.
#[test]
fn gpt2_variant_logits_match_transformers_with_and_without_padding() {
    logits_match_transformers("gpt2_variant");
}

/// HF's causal LM loss (`labels = input_ids`, shifted inside the model): ours
/// by shifting, logits[:, :-1] against ids[:, 1:], mean; then each parameter's
/// gradient against HF's.
fn loss_and_grads_match_transformers(name: &str) {
    let model = load_clean(&fixture().join(name));
    let ids = reference("input_ids");
    let s = ids.size()[1];
    let logits = model.logits(&ids, None, false).to_kind(Kind::Float);
    let loss = logits.narrow(1, 0, s - 1).reshape([-1, model.vocab_size()]).cross_entropy_loss::<Tensor>(
        &ids.narrow(1, 1, s - 1).reshape([-1]),
        None,
        Reduction::Mean,
        -100,
        0.0,
    );
    let (ours, hf) = (loss.double_value(&[]), reference(&format!("{name}_loss")).double_value(&[]));
    let rel = (ours - hf).abs() / hf.abs();
    println!("{name}: loss {ours:.7} vs transformers {hf:.7} (relative {rel:.3e})");
    assert!(rel < LOSS_TOL, "{name}: loss {ours} vs {hf}");
    loss.backward();
    // (The key third of c_attn's bias has a true gradient of 0: rounding noise, floored.)
    let reference = read_tensors(&fixture().join("grads").join(format!("{name}.safetensors")));
    assert_grads_match(name, &model.vs.variables(), &reference, GRAD_TOL);
}

#[test]
fn gpt2_loss_and_gradients_match_transformers() {
    loss_and_grads_match_transformers("gpt2");
}

#[test]
fn gpt2_variant_loss_and_gradients_match_transformers() {
    loss_and_grads_match_transformers("gpt2_variant");
}

/// The Hub's naming: no `transformer.` prefix, `attn.bias` / `attn.masked_bias`
/// buffers, `pytorch_model.bin`; nothing missing, the same logits.
#[test]
fn gpt2_hub_style_state_dict_loads_with_nothing_missing() {
    let model = load_clean(&fixture().join("gpt2_hub"));
    let (plain, padded) = our_logits(&model);
    assert!(max_diff(&plain, &reference("gpt2_logits")) < TOL);
    assert!(max_diff(&padded, &reference("gpt2_pad_logits")) < TOL);
}

/// What `save_dir` writes has save_pretrained's names, loads in
/// `AutoModelForCausalLM` with nothing missing or unexpected, and gives our logits.
#[test]
fn gpt2_saved_dirs_load_in_transformers_without_missing_keys() {
    let dir = fixture().join("saved");
    let names = |p: &Path| {
        let mut n: Vec<String> = read_tensors(p).into_iter().map(|(n, _)| n).collect();
        n.sort();
        n
    };
    let mut jobs = Vec::new();
    let mut ours = Vec::new();
    // The Hub-style folder saves under save_pretrained's names too.
    for (name, source) in [("gpt2", "gpt2"), ("gpt2_variant", "gpt2_variant"), ("gpt2_hub", "gpt2")] {
        let model = load_clean(&fixture().join(name));
        let out = dir.join(name);
        model.save_dir(&out).unwrap();
        assert_eq!(names(&out.join("model.safetensors")), names(&fixture().join(source).join("model.safetensors")));
        jobs.push(serde_json::json!([out, out.join("hf_logits.safetensors")]));
        ours.push((name, our_logits(&model)));
    }
    let jobs_file = dir.join("jobs.json");
    std::fs::write(&jobs_file, serde_json::Value::from(jobs).to_string()).unwrap();
    run_script("make_gpt2.py", &[Path::new("--check"), &jobs_file, &fixture().join("reference.safetensors")]);
    for (name, (plain, padded)) in ours {
        let path = dir.join(name).join("hf_logits.safetensors");
        if let Ok(msg) = std::fs::read_to_string(path.with_extension("safetensors.error")) {
            panic!("transformers could not load our {name} dir: {msg}");
        }
        let (hf_plain, hf_padded) = (tensor_in(&path, "logits"), tensor_in(&path, "pad_logits"));
        let (d1, d2) = (max_diff(&plain, &hf_plain), max_diff(&padded, &hf_padded));
        println!("{name}: saved dir, transformers vs ours: {d1:.3e} (no padding), {d2:.3e} (padded)");
        assert!(d1 < TOL && d2 < TOL, "{name}: {d1} / {d2}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    }
}

/// The cached decode of the fixture: 5 tokens, then 4 one at a time, against
/// transformers' logits of all of them.
#[test]
fn gpt2_cached_decode_matches_transformers() {
    let model = load_clean(&fixture().join("gpt2"));
    let ids = reference("input_ids").narrow(1, 0, 9);
    let mut cache = KvCache::default();
    let mut steps = vec![model.decode_logits(&ids.narrow(1, 0, 5), &mut cache).unwrap()];
    for i in 5..9 {
        steps.push(model.decode_logits(&ids.narrow(1, i, 1), &mut cache).unwrap());
    }
    let diff = max_diff(&Tensor::cat(&steps, 1), &reference("gpt2_logits").narrow(1, 0, 9));
    assert!(diff < TOL, "{diff:.3e}");
}

#[test]
fn gpt2_bf16_copy_runs_forward_close_to_fp32() {
    let model = load_clean(&fixture().join("gpt2"));
    let bf16 = model.to_kind_copy(Kind::BFloat16).unwrap();
    assert!(bf16.vs.variables().values().all(|t| t.kind() == Kind::BFloat16));
    let (plain, padded) = our_logits(&bf16);
    assert_eq!(plain.kind(), Kind::BFloat16);
    let d1 = max_diff(&plain, &reference("gpt2_logits"));
    let d2 = max_diff(&padded, &reference("gpt2_pad_logits"));
    println!("gpt2: bf16 vs fp32 transformers: {d1:.3e} (no padding), {d2:.3e} (padded)");
    assert!(d1 < 0.05 && d2 < 0.05, "{d1} / {d2}");
}
