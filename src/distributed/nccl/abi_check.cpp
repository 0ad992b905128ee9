// Build-time check of the hand-written NCCL bindings (library.rs) against the
// nccl.h shipped beside libtorch (pip's nvidia/nccl/include): build.rs compiles
// this file wherever that header exists, with each value of abi.rs as a
// MLM_NCCL_* definition, and a mismatch fails the build naming the value.
// Nothing here is linked into mlm.
#include <cstddef>
#include <type_traits>

#include <nccl.h>

static_assert(ncclSuccess == MLM_NCCL_SUCCESS, "abi.rs SUCCESS != ncclSuccess");
static_assert(ncclInvalidUsage == MLM_NCCL_INVALID_USAGE, "abi.rs INVALID_USAGE != ncclInvalidUsage");
static_assert(ncclInProgress == MLM_NCCL_IN_PROGRESS, "abi.rs IN_PROGRESS != ncclInProgress");
static_assert(ncclFloat32 == MLM_NCCL_FLOAT32, "abi.rs FLOAT32 != ncclFloat32");
static_assert(ncclBfloat16 == MLM_NCCL_BFLOAT16, "abi.rs BFLOAT16 != ncclBfloat16");
static_assert(ncclSum == MLM_NCCL_SUM, "abi.rs SUM != ncclSum");
static_assert(sizeof(ncclUniqueId) == MLM_NCCL_UNIQUE_ID_BYTES, "abi.rs UNIQUE_ID_BYTES != sizeof(ncclUniqueId)");

// The enums travel as C ints (library.rs: c_int).
static_assert(sizeof(ncclResult_t) == sizeof(int), "ncclResult_t is not an int");
static_assert(sizeof(ncclDataType_t) == sizeof(int), "ncclDataType_t is not an int");
static_assert(sizeof(ncclRedOp_t) == sizeof(int), "ncclRedOp_t is not an int");
static_assert(sizeof(ncclComm_t) == sizeof(void*), "ncclComm_t is not a pointer");

// library.rs's Config: the leading fields of ncclConfig_t.
static_assert(offsetof(ncclConfig_t, size) == MLM_NCCL_CONFIG_OFFSET_SIZE, "ncclConfig_t.size moved");
static_assert(offsetof(ncclConfig_t, magic) == MLM_NCCL_CONFIG_OFFSET_MAGIC, "ncclConfig_t.magic moved");
static_assert(offsetof(ncclConfig_t, version) == MLM_NCCL_CONFIG_OFFSET_VERSION, "ncclConfig_t.version moved");
static_assert(offsetof(ncclConfig_t, blocking) == MLM_NCCL_CONFIG_OFFSET_BLOCKING, "ncclConfig_t.blocking moved");
static_assert(std::is_same<decltype(ncclConfig_t::blocking), int>::value, "ncclConfig_t.blocking is not an int");
static constexpr ncclConfig_t initial = NCCL_CONFIG_INITIALIZER;
static_assert(initial.magic == MLM_NCCL_CONFIG_MAGIC, "abi.rs CONFIG_MAGIC != NCCL_CONFIG_INITIALIZER's magic");

// The signatures of the bound functions (library.rs's `type` aliases).
static_assert(std::is_same<decltype(&ncclGetVersion), ncclResult_t (*)(int*)>::value, "ncclGetVersion");
static_assert(std::is_same<decltype(&ncclGetUniqueId), ncclResult_t (*)(ncclUniqueId*)>::value, "ncclGetUniqueId");
static_assert(std::is_same<decltype(&ncclCommInitRankConfig),
                           ncclResult_t (*)(ncclComm_t*, int, ncclUniqueId, int, ncclConfig_t*)>::value,
              "ncclCommInitRankConfig");
static_assert(std::is_same<decltype(&ncclAllReduce), ncclResult_t (*)(const void*, void*, size_t, ncclDataType_t,
                                                                      ncclRedOp_t, ncclComm_t, cudaStream_t)>::value,
              "ncclAllReduce");
static_assert(std::is_same<decltype(&ncclCommGetAsyncError), ncclResult_t (*)(ncclComm_t, ncclResult_t*)>::value,
              "ncclCommGetAsyncError");
static_assert(std::is_same<decltype(&ncclCommAbort), ncclResult_t (*)(ncclComm_t)>::value, "ncclCommAbort");
static_assert(std::is_same<decltype(&ncclCommDestroy), ncclResult_t (*)(ncclComm_t)>::value, "ncclCommDestroy");
static_assert(std::is_same<decltype(&ncclCommFinalize), ncclResult_t (*)(ncclComm_t)>::value, "ncclCommFinalize");
static_assert(std::is_same<decltype(&ncclGetErrorString), const char* (*)(ncclResult_t)>::value, "ncclGetErrorString");
static_assert(std::is_same<decltype(&ncclGetLastError), const char* (*)(ncclComm_t)>::value, "ncclGetLastError");
