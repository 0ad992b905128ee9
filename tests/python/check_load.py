"""Loads a model directory written by mlm into transformers and records its logits.

Usage: check_load.py MODEL_DIR REFERENCE_SAFETENSORS OUT_SAFETENSORS

Asserts that `AutoModelForMaskedLM.from_pretrained(MODEL_DIR)` reports no missing,
unexpected or mismatched keys, then runs the `input_ids` / `attention_mask` of the
reference file through it in eval mode and writes `logits` (fp32) to OUT.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM


def main(model_dir, reference, out):
    model, info = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and len(v) > 0}
    problems.update({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if problems:
        sys.exit(f"{model_dir}: transformers reported {json.dumps(problems)}")
    model.eval()
    ref = load_file(reference)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    save_file({"logits": logits.float().contiguous()}, out)
    print(f"{type(model).__name__} loaded cleanly from {model_dir}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
