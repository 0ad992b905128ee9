"""Loads a model directory written by mlm into transformers and records its logits.

Usage: check_load.py MODEL_DIR REFERENCE_SAFETENSORS OUT_SAFETENSORS [PREFIX]
       check_load.py --jobs JOBS_JSON REFERENCE_SAFETENSORS

The second form runs a list of [MODEL_DIR, OUT_SAFETENSORS, PREFIX] in one process
(one import of transformers); a directory that fails writes its message to
OUT_SAFETENSORS + ".error" instead of stopping the others.

Asserts that `AutoModelForMaskedLM.from_pretrained(MODEL_DIR)` reports no missing,
unexpected or mismatched keys, then runs the `PREFIXinput_ids` / `PREFIXattention_mask`
of the reference file (PREFIX e.g. `roberta_`, empty by default) through it in eval
mode and writes `logits` (fp32) to OUT.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForMaskedLM


def main(model_dir, reference, out, prefix=""):
    model, info = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and len(v) > 0}
    problems.update({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if problems:
        sys.exit(f"{model_dir}: transformers reported {json.dumps(problems)}")
    model.eval()
    ref = load_file(reference)
    with torch.no_grad():
        logits = model(input_ids=ref[prefix + "input_ids"], attention_mask=ref[prefix + "attention_mask"]).logits
    save_file({"logits": logits.float().contiguous()}, out)
    print(f"{type(model).__name__} loaded cleanly from {model_dir}")


def jobs(jobs_json, reference):
    with open(jobs_json) as f:
        todo = json.load(f)
    for model_dir, out, prefix in todo:
        try:
            main(model_dir, reference, out, prefix)
        except BaseException as e:  # noqa: BLE001 - reported to the Rust test
            with open(out + ".error", "w") as f:
                f.write(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    if sys.argv[1] == "--jobs":
        jobs(sys.argv[2], sys.argv[3])
    else:
        main(*sys.argv[1:5])
