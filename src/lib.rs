//! mlm: masked-language-model training and domain adaptation for BERT-family
//! encoders (BERT, DistilBERT, RoBERTa, DeBERTa-v2/v3), reading and writing
//! Hugging Face's model layout.
//! The user guide is in `docs/`.

// tch's `x += y` is the in-place `add_`, which autograd refuses on tensors it
// needs for backward: the out-of-place `x = x + y` is deliberate.
#![allow(clippy::assign_op_pattern)]
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod durable;
pub mod infer;
pub mod lock;
pub mod logging;
pub mod model;
pub mod progress;
pub mod shims;
pub mod train;
