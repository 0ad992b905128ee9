#!/usr/bin/env python3
"""The Python reference preprocessing that `mlm prepare` is measured against.

The Hugging Face course's MLM recipe (chapter 7, "Fine-tuning a masked language
model") with `datasets.map`, end to end and nothing cached:

    load_dataset("text", ...)                       # each line a document
    .map(tokenize_function, batched=True, num_proc) # input_ids + word_ids
    .map(group_texts, batched=True, num_proc)       # concatenate, cut to --block, labels
    .train_test_split(test_size=0.05, seed=42)

`tokenize_function` drops blank lines (as `data.document_boundary = "line"` does, and
as `run_mlm --line_by_line` does), so both sides tokenize the same documents.
`group_texts` is the course's, quadratic `sum(lists, [])` included: what users run.

Prints one JSON object on stdout: tokens (tokenized, before the remainder is
dropped), seconds, tokens_per_s, blocks, input bytes.
"""
import argparse
import glob
import json
import os
import shutil
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", required=True, help="text files or glob patterns")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--num-proc", type=int, default=os.cpu_count())
    return p.parse_args()


def main():
    a = parse_args()
    files = sorted({p for pat in a.files for p in glob.glob(pat)})
    if not files:
        raise SystemExit(f"reference_prepare: no file matches {a.files}")
    in_bytes = sum(os.path.getsize(f) for f in files)
    cache_dir = tempfile.mkdtemp(prefix="mlm-bench-datasets-")
    os.environ["HF_DATASETS_CACHE"] = cache_dir  # before importing datasets
    import datasets
    from datasets import load_dataset
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    block = a.block
    try:
        t0 = time.perf_counter()
        # The file's own special tokens: BERT's and DeBERTa-v3's [..], or RoBERTa's <..>.
        with open(a.tokenizer, encoding="utf-8") as f:
            added = {t["content"] for t in json.load(f).get("added_tokens", [])}
        if "<mask>" in added:
            names = dict(unk_token="<unk>", sep_token="</s>", pad_token="<pad>", cls_token="<s>", mask_token="<mask>")
        else:
            names = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer, **names)

        def tokenize_function(examples):
            result = tokenizer([t for t in examples["text"] if t.strip()])
            if tokenizer.is_fast:
                result["word_ids"] = [result.word_ids(i) for i in range(len(result["input_ids"]))]
            return result

        def group_texts(examples):
            concatenated = {k: sum(examples[k], []) for k in examples.keys()}
            total_length = len(concatenated[list(examples.keys())[0]])
            total_length = (total_length // block) * block
            result = {k: [t[i:i + block] for i in range(0, total_length, block)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        raw = load_dataset("text", data_files={"train": files}, cache_dir=cache_dir)["train"]
        tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"], num_proc=a.num_proc)
        lm = tokenized.map(group_texts, batched=True, num_proc=a.num_proc)
        split = lm.train_test_split(test_size=0.05, seed=42)
        seconds = time.perf_counter() - t0

        import pyarrow.compute as pc

        tokens = int(pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py())
        out = {
            "impl": f"datasets {datasets.__version__} map, num_proc={a.num_proc}",
            "files": len(files),
            "input_bytes": in_bytes,
            "documents": len(tokenized),
            "tokens": tokens,
            "blocks": len(lm),
            "train_blocks": len(split["train"]),
            "test_blocks": len(split["test"]),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "mb_per_s": in_bytes / 1e6 / seconds,
        }
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
