//! The checks of `config.json` every architecture shares (sizes and
//! probabilities in range, a tied decoder), and whether a model of that shape
//! fits in host memory before it is built. The keys each architecture reads
//! and refuses are checked by its own config struct (`validate`).
use anyhow::{bail, Result};

/// Refuses what no architecture can build, naming the key: a value out of
/// range, an untied decoder.
pub(super) fn check_shared(c: &serde_json::Value) -> Result<()> {
    check_ranges(c)?;
    if c.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(false) {
        bail!("tie_word_embeddings = false in config.json is not supported: the MLM decoder is tied to the word embeddings");
    }
    Ok(())
}

/// Sizes every architecture's `config.json` may give, with their allowed range:
/// a value outside would build a model that cannot exist (negative sizes) or
/// cannot be allocated (a million-wide hidden size).
const SIZES: [(&str, i64, i64); 21] = [
    ("vocab_size", 1, 1 << 24),
    ("hidden_size", 1, 1 << 16),
    ("dim", 1, 1 << 16),
    ("num_hidden_layers", 1, 1024),
    ("n_layers", 1, 1024),
    ("num_attention_heads", 1, 1024),
    ("n_heads", 1, 1024),
    ("intermediate_size", 1, 1 << 18),
    ("hidden_dim", 1, 1 << 18),
    ("max_position_embeddings", 1, 1 << 20),
    ("type_vocab_size", 0, 1 << 16),
    ("embedding_size", 1, 1 << 16),
    ("position_buckets", -1, 1 << 16),
    ("max_relative_positions", -1, 1 << 20),
    ("conv_kernel_size", 0, 1025),
    ("conv_groups", 1, 1 << 16),
    // GPT-2's names
    ("n_embd", 1, 1 << 16),
    ("n_layer", 1, 1024),
    ("n_head", 1, 1024),
    ("n_inner", 1, 1 << 18),
    ("n_positions", 1, 1 << 20),
];

/// Probabilities (dropouts), in [0, 1).
const DROPOUTS: [&str; 9] = [
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "attention_dropout",
    "pooler_dropout",
    "qa_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
];

/// Refuses `config.json` values outside their meaning, naming the key.
fn check_ranges(c: &serde_json::Value) -> Result<()> {
    for (key, lo, hi) in SIZES {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_i64() {
            Some(n) if (lo..=hi).contains(&n) => {}
            _ => bail!("{key} = {v} in config.json must be an integer from {lo} to {hi}"),
        }
    }
    for key in DROPOUTS {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_f64() {
            Some(p) if (0.0..1.0).contains(&p) => {}
            _ => bail!("{key} = {v} in config.json must be a probability in [0, 1)"),
        }
    }
    for (key, zero_ok) in [("layer_norm_eps", false), ("layer_norm_epsilon", false), ("initializer_range", true)] {
        let Some(v) = c.get(key).filter(|v| !v.is_null()) else { continue };
        match v.as_f64() {
            Some(x) if x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)) => {}
            _ => bail!(
                "{key} = {v} in config.json must be a finite {} number",
                if zero_ok { "non-negative" } else { "positive" }
            ),
        }
    }
    Ok(())
}

/// Parameters of an encoder of `config.json`'s shape (embeddings, layers with
/// attention and feed-forward, the MLM head's transform), for a memory check
/// before anything is allocated.
pub fn estimate_parameters(c: &serde_json::Value) -> u64 {
    let get =
        |keys: &[&str], default: u64| keys.iter().find_map(|k| c.get(*k).and_then(|v| v.as_u64())).unwrap_or(default);
    let vocab = get(&["vocab_size"], 30522);
    let h = get(&["hidden_size", "dim", "n_embd"], 768);
    let layers = get(&["num_hidden_layers", "n_layers", "n_layer"], 12);
    let ff = get(&["intermediate_size", "hidden_dim", "n_inner"], 4 * h);
    let pos = get(&["max_position_embeddings", "n_positions"], 512);
    let per_layer = (4 * h * h + 4 * h).saturating_add(2 * h * ff + ff + h).saturating_add(4 * h);
    (vocab + pos + 2).saturating_mul(h).saturating_add(layers.saturating_mul(per_layer)).saturating_add(h * h + vocab)
}

/// Refuses, before allocating, a CPU model whose fp32 weights alone exceed the
/// memory available (a GPU reports its own out-of-memory errors).
/// Every model is built in host memory first (`MaskedLm::from_config_json`).
pub(super) fn check_fits_in_memory(c: &serde_json::Value) -> Result<()> {
    let bytes = estimate_parameters(c).saturating_mul(4);
    if let Some(avail) = available_memory() {
        if bytes > avail {
            bail!(
                "the model of this config.json has about {:.1}B parameters ({:.1} GiB in fp32), more than the {:.1} GiB \
                 of memory available: check its sizes (hidden_size, num_hidden_layers, vocab_size, intermediate_size)",
                estimate_parameters(c) as f64 / 1e9,
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
