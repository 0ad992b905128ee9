//! DeBERTa's model-level tests (the attention's are in `deberta_attention/tests.rs`).
use super::*;

#[test]
fn distance_buckets_are_built_once_per_block_length_and_device() {
    let config: DebertaV2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "relative_attention": true, "position_buckets": 8,
        "max_relative_positions": 64, "pos_att_type": ["p2c", "c2p"]
    }))
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = DebertaV2ForMaskedLM::new(&vs.root(), config).unwrap();
    // Shorter than the buckets, where bucketing starts (s > 4), longer than the span.
    for s in [1, 3, 5, 13, 40] {
        let first = model.distance_buckets(s, Device::Cpu);
        assert_eq!(first, distance_buckets(s, &model.spec), "s {s}");
        assert_eq!(first.size(), [2 * s - 1]);
        assert_eq!(model.distance_buckets(s, Device::Cpu).data_ptr(), first.data_ptr(), "s {s}: rebuilt");
    }
    assert_eq!(model.buckets.lock().unwrap().len(), 5);
}
