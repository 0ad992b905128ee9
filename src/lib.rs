//! mlm: masked-language-model training and domain adaptation for BERT-family
//! encoders (DistilBERT, BERT), reading and writing Hugging Face's model layout.
//! The user guide is in `docs/`.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod infer;
pub mod logging;
pub mod model;
pub mod train;
