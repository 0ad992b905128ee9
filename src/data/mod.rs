//! Data preparation, token store and masking.
//!
//! Text, JSON-lines and Parquet files are read into documents ([`source`]),
//! tokenized with the model's `tokenizer.json` ([`tokenizer`], exactly and
//! faster for BERT-style WordPiece files by [`wordpiece`], for Unigram and BPE
//! files by [`subword`] and [`pretokenize`]), concatenated,
//! chunked and split ([`split`]) into a memory-mapped token store on disk, with each
//! token's word-start mark for whole-word masking ([`prepare`], [`store`]).
//! During training, [`loader`] orders each rank's chunks per epoch and masks
//! them in background threads ([`masking`]); the mask of a chunk is a pure
//! function of `(seed, epoch, chunk id)`.
pub mod loader;
pub mod masking;
pub mod prepare;
pub mod pretokenize;
pub mod rng;
pub mod source;
pub mod split;
pub mod spm;
pub mod store;
pub mod subword;
pub mod tokenizer;
pub mod vocab_txt;
pub mod wordpiece;

#[cfg(test)]
pub(crate) mod testutil;

pub use loader::{epoch_order, eval_batches, rank_shard, worker_chunks, Batch, BatchStream};
pub use masking::{mask_chunk, mask_chunk_words, MaskingParams};
pub use prepare::prepare;
pub use store::{Manifest, Prepared, SourceInfo, TokenStore, WordStarts};
pub use tokenizer::TextTokenizer;
