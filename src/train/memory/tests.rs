//! The estimate's terms against what autograd saves, and its rules.
use super::*;

fn bert() -> ModelShape {
    ModelShape::from_config(&serde_json::json!({
        "model_type": "bert", "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 128,
    }))
    .unwrap()
}

fn job(target: Target, precision: Precision) -> Job {
    Job {
        target,
        precision,
        block: 128,
        batch: 32,
        micro_batch_size: MicroBatchSize::Whole,
        activation_checkpointing: false,
        sparse_head: true,
        mlm_probability: 0.15,
        causal: false,
        eval_batch: 16,
        gemm_in_fp32: false,
    }
}

/// What torch 2.11's autograd saves in one CPU layer of our BERT and
/// DeBERTa in fp32 with dropout 0.1, for 4 sequences of 128 tokens, hidden
/// 256, 4 heads, intermediate 1024 (DeBERTa: c2p and p2c, span 256), as
/// counted by `torch.autograd.graph.saved_tensors_hooks` on the same ops
/// (distinct storages, parameters left out): `tests/python/saved_tensors.py`.
#[test]
fn a_cpu_layer_saves_what_autograd_saves() {
    let j = job(Target::Cpu, Precision::Fp32);
    assert_eq!(Estimate::new(&bert(), &j).layer_saved(4), 12_591_104);
    let deberta = ModelShape::from_config(&serde_json::json!({
        "model_type": "deberta-v2", "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 1024, "relative_attention": true,
        "position_buckets": 256, "pos_att_type": "p2c|c2p", "share_att_key": true,
        "norm_rel_ebd": "layer_norm", "position_biased_input": false,
    }))
    .unwrap();
    assert_eq!(Estimate::new(&deberta, &j).layer_saved(4), 15_212_528);
}

fn gpt2(vocab: u64) -> ModelShape {
    ModelShape::from_config(&serde_json::json!({
        "model_type": "gpt2", "vocab_size": vocab, "n_embd": 256, "n_layer": 4, "n_head": 4,
        "n_positions": 128,
    }))
    .unwrap()
}

/// GPT-2's pre-LN block saves what BERT's post-LN layer saves; its head is
/// `ln_f` and the tied projection. `tests/python/saved_tensors.py` (vocab
/// 512): 12,591,104 bytes a block, 2,092,964 for the head, of which the
/// 508 positions and targets (i64, counted with the batch) and a 4-byte
/// scalar are not the head's own.
#[test]
fn a_cpu_gpt2_block_and_head_save_what_autograd_saves() {
    let causal = Job { causal: true, ..job(Target::Cpu, Precision::Fp32) };
    let (m, b) = (gpt2(512), bert());
    let e = Estimate::new(&m, &causal);
    assert_eq!(e.layer_saved(4), 12_591_104);
    assert_eq!(e.head_saved(4), 2_092_964 - 2 * 508 * 8 - 4);
    assert_eq!(m.head_parameters(), 2 * 256);
    assert_eq!(m.parameters, (512 + 128) * 256 + 4 * m.layer_parameters() + 2 * 256);
    // No LayerNorm over the embeddings, none of the transform in the head.
    let bert_causal = Estimate::new(&b, &causal);
    assert_eq!(bert_causal.embeddings_saved(4) - e.embeddings_saved(4), 4 * 128 * (8 + 256 * 4 + 2 * 4) - 128 * 8);
}

/// More predicted positions than a chunk holds: the head's gradients are
/// summed over the chunks.
#[test]
fn a_head_in_chunks_holds_its_running_sums() {
    let m = gpt2(50257);
    let causal = Job { causal: true, block: 128, ..job(Target::Cuda, Precision::Bf16) };
    let e = Estimate::new(&m, &causal);
    assert_eq!(e.head_sums(4), 0, "508 positions fit one chunk of 1335");
    let sums = e.head_sums(32);
    assert_eq!(sums, 3 * ((50257 * 256 + 2 * 256) * 2 + 32 * 128 * 256 * 2));
    assert_eq!(Estimate::new(&m, &Job { sparse_head: false, ..causal.clone() }).head_sums(32), 0);
}

#[test]
fn a_causal_head_predicts_every_next_token_a_chunk_at_a_time() {
    let m = bert();
    let causal = Job { causal: true, ..job(Target::Cuda, Precision::Bf16) };
    let e = Estimate::new(&m, &causal);
    assert_eq!(e.predicted(4), 4 * 127);
    assert_eq!(e.projected(4), 4 * 127);
    // 2^26 logits over 30522 words: 2198 positions at once, however many rows.
    assert_eq!(e.projected(32), 2198);
    assert_eq!(e.head_saved(32), e.head_saved(64));
    let masked_job = job(Target::Cuda, Precision::Bf16);
    let masked = Estimate::new(&m, &masked_job);
    assert_eq!(masked.predicted(32), (0.15f64 * 32.0 * 128.0).ceil() as u64);
    assert!(e.pass(32, false).peak_bytes > masked.pass(32, false).peak_bytes);
}

#[test]
fn states_are_sixteen_bytes_per_parameter_plus_the_bf16_copy() {
    let m = bert();
    let fp32 = job(Target::Cuda, Precision::Fp32);
    let bf16 = job(Target::Cuda, Precision::Bf16);
    assert_eq!(Estimate::new(&m, &fp32).states().total(), 16 * m.parameters);
    assert_eq!(Estimate::new(&m, &bf16).states().total(), 18 * m.parameters);
    let fp16 = job(Target::Cuda, Precision::Fp16);
    assert_eq!(Estimate::new(&m, &fp16).states().total(), 18 * m.parameters);
}

#[test]
fn checkpointing_keeps_less_and_peaks_grow_with_rows() {
    let m = bert();
    for target in [Target::Cpu, Target::Cuda] {
        let j = job(target, Precision::Bf16);
        let e = Estimate::new(&m, &j);
        let (plain, ckpt) = (e.pass(32, false), e.pass(32, true));
        assert!(ckpt.activations_bytes < plain.activations_bytes / 2, "{target:?}: {ckpt:?} vs {plain:?}");
        assert!(ckpt.peak_bytes < plain.peak_bytes);
        assert!(e.pass(16, false).peak_bytes < plain.peak_bytes);
        assert!(e.pass(1, true).peak_bytes > e.states().total());
    }
}
