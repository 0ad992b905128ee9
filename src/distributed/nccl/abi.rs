// The values of nccl.h that the hand-written bindings (library.rs) rely on.
// One source for both sides: library.rs includes this file, and build.rs
// includes it too and hands each value to abi_check.cpp, which compiles only
// where it agrees with the nccl.h shipped beside libtorch (static_assert).
// Plain `const` items only: build.rs includes this file as it is.

/// `ncclSuccess`, `ncclInvalidUsage`, `ncclInProgress`.
pub const SUCCESS: i32 = 0;
pub const INVALID_USAGE: i32 = 5;
pub const IN_PROGRESS: i32 = 7;
/// `ncclFloat32`, `ncclBfloat16` (NCCL >= 2.10).
pub const FLOAT32: i32 = 7;
pub const BFLOAT16: i32 = 9;
/// `ncclSum`.
pub const SUM: i32 = 0;
/// `NCCL_UNIQUE_ID_BYTES`.
pub const UNIQUE_ID_BYTES: usize = 128;
/// `ncclConfig_t`'s magic (`NCCL_CONFIG_INITIALIZER`) and the byte offsets of
/// the fields our `Config` sets: `size`, `magic`, `version`, `blocking`.
pub const CONFIG_MAGIC: u32 = 0xcafe_beef;
pub const CONFIG_OFFSETS: [usize; 4] = [0, 8, 12, 16];
