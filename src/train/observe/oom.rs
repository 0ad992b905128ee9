//! What an out-of-memory error says during training: the loop records what it
//! runs (the step and its sizes, an evaluation, a save) and what would make it
//! fit; `logging::quiet_panics`' hook prints it when an allocation fails.
use crate::config::{nearest_divisors, Config};
use crate::logging::{clear_activity, set_activity};

/// The forward and backward passes of optimizer step `step` (1-based), `rows`
/// sequences per pass.
pub fn at_step(step: usize, cfg: &Config, batch: usize, rows: usize) {
    let block = cfg.data.block_size;
    set_activity(
        format!(" at step {step} (batch {batch}, micro-batch {rows}, block {block})"),
        step_advice(batch, rows),
    );
}

/// What makes a training pass of `rows` of a `batch` fit.
fn step_advice(batch: usize, rows: usize) -> String {
    let rest = "set training.activation_checkpointing = true, or use a smaller data.block_size or model";
    if rows <= 1 {
        return format!("{rest} (training.micro_batch_size is already 1)");
    }
    let smaller = nearest_divisors(batch, rows - 1).0;
    format!(
        "lower training.micro_batch_size to {smaller} or less (a divisor of training.batch_size = {batch}, which \
         stays the same; \"auto\" finds the largest that fits on a GPU), {rest}"
    )
}

/// The `"auto"` search for the micro-batch size (its own allocation failures
/// are caught; this names anything else that runs out).
pub fn finding_micro_batch(cfg: &Config, batch: usize) {
    let block = cfg.data.block_size;
    set_activity(
        format!(" while finding training.micro_batch_size = \"auto\" (batch {batch}, block {block})"),
        "set training.micro_batch_size to a small divisor of training.batch_size, set \
         training.activation_checkpointing = true, or use a smaller data.block_size or model"
            .into(),
    );
}

/// The held-out evaluation after `step` optimizer steps.
pub fn in_evaluation(step: usize, cfg: &Config) {
    let when = if step == 0 { "before training".to_string() } else { format!("at step {step}") };
    set_activity(
        format!(" in the evaluation {when} (eval.batch_size {}, block {})", cfg.eval.batch_size, cfg.data.block_size),
        "lower eval.batch_size, or use a smaller data.block_size or model".into(),
    );
}

/// Writing the checkpoint of `step` (the last complete one stays intact).
pub fn saving(step: usize) {
    set_activity(
        format!(" saving the checkpoint of step {step}"),
        "free host memory and resume: the last complete checkpoint is intact".into(),
    );
}

/// Anything else (the fill-mask probes): the generic advice.
pub fn elsewhere() {
    clear_activity();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_advice_names_a_smaller_divisor() {
        let a = step_advice(512, 64);
        assert!(a.contains("training.micro_batch_size to 32 or less") && a.contains("activation_checkpointing"), "{a}");
        assert!(step_advice(12, 4).contains("to 3 or less"));
        assert!(step_advice(8, 1).contains("already 1"));
    }
}
