//! Data preparation, token store and masking.
//!
//! Text files are read into documents ([`source`]), tokenized with the model's
//! `tokenizer.json` ([`tokenizer`]), concatenated, chunked and split into a
//! memory-mapped token store on disk ([`prepare`], [`store`]). During training,
//! [`loader`] orders each rank's chunks per epoch and masks them in background
//! threads ([`masking`]); the mask of a chunk is a pure function of
//! `(seed, epoch, chunk id)`.
pub mod loader;
pub mod masking;
pub mod prepare;
pub mod rng;
pub mod source;
pub mod store;
pub mod tokenizer;

#[cfg(test)]
pub(crate) mod testutil;

pub use loader::{epoch_order, eval_batches, rank_shard, Batch, BatchStream};
pub use masking::{mask_chunk, MaskingParams};
pub use prepare::prepare;
pub use store::{Manifest, Prepared, SourceInfo, TokenStore};
pub use tokenizer::TextTokenizer;
