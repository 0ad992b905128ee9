#!/usr/bin/env python3
"""The Python reference training step that `mlm train` is measured against.

What the Hugging Face Trainer does per step with `bf16=True` (or fp32), written as a
plain PyTorch loop so that nothing but the step is timed:

- `AutoModelForMaskedLM.from_config(config.json)`: random init, the full MLM head
  (logits over the whole vocabulary at every position, as transformers computes them);
- `DataCollatorForLanguageModeling(mlm_probability=0.15)` on pre-tokenized blocks
  (the corpus is tokenized and cut into `--block` tokens before timing, as
  `run_mlm`'s `group_texts` does), collated in the training process (the Trainer's
  default `dataloader_num_workers=0`), inside the timed step;
- bf16: `torch.autocast(device, dtype=torch.bfloat16)` around the forward, as the
  Trainer does; fp32 weights, gradients and optimizer;
- `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (fused when supported, else foreach;
  no decay on biases and LayerNorm weights), a linear schedule.

`--objective clm` is `run_clm`'s step instead: `AutoModelForCausalLM.from_config`,
the tokenizer's output concatenated with no special tokens and cut into blocks
(`group_texts`), `labels = input_ids` (GPT2LMHeadModel shifts inside its loss;
logits over the whole vocabulary at every position), `default_data_collator`
(no masking) in the step.

Prints one JSON object on stdout: tokens_per_s, step_s, per-phase mean times, each
timed step's time (`step_times_s`, where the phases are synchronised: the CPU),
flops_per_token (model FLOPs, see `model_flops_per_token`) and, on CUDA, mfu.

    python benches/reference_train.py --config cfg.json --tokenizer tokenizer.json \
        --files 'docs/*.rst.txt' --block 128 --batch 8 --steps 12 --warmup 3 --precision bf16
"""
import argparse
import glob
import json
import math
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json of the model (random init)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--files", nargs="+", required=True, help="text files or glob patterns")
    p.add_argument("--objective", choices=["mlm", "clm"], default="mlm",
                   help="mlm: AutoModelForMaskedLM + the masking collator; clm: AutoModelForCausalLM, labels = inputs")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="on CUDA, fp32 matmuls as TF32 (as mlm's training.tf32, default on)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (CPU)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--phase-times", action="store_true",
                   help="on CUDA, synchronize between phases to time them (perturbs the step); always on CPU")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="accelerator peak (dense bf16/fp32) for MFU; 0: guessed from the GPU's name")
    return p.parse_args()


def read_blocks(files, tokenizer_path, block, special_tokens=True):
    """Blank-line separated documents (as `data.document_boundary = "blank_line"`),
    each wrapped in [CLS] ... [SEP] (`special_tokens`; none for a causal LM, as
    GPT-2's tokenizer adds none), concatenated and cut into `block` tokens; the
    remainder is dropped (run_mlm's and run_clm's group_texts)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    tok.no_truncation()
    tok.no_padding()
    paths = sorted({p for pat in files for p in glob.glob(pat)})
    if not paths:
        sys.exit(f"reference_train: no file matches {files}")
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            para = []
            for line in f:
                if line.strip():
                    para.append(line.rstrip("\n"))
                elif para:
                    docs.append("\n".join(para))
                    para = []
            if para:
                docs.append("\n".join(para))
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=special_tokens):
        ids.extend(enc.ids)
    n = len(ids) // block
    return [ids[i * block:(i + 1) * block] for i in range(n)], len(docs)


def model_flops_per_token(cfg, block, mlm_probability=0.15, objective="mlm"):
    """Model FLOPs per trained token, forward + backward (3x forward), the usual
    6N + 12*L*d*T estimate: 6 x the encoder's and the head transform's matmul
    weights, 12*L*d*T for attention scores and values (T: the positions a query
    sees, ModernBERT's local layers `local_attention + 1` of them), and the
    vocabulary projection counted at the masked positions only for `mlm` (the work
    the objective needs; an implementation computing it everywhere does more than
    this), at every position for `clm`. Reads BERT-, DistilBERT-, DeBERTa-,
    GPT-2- and ModernBERT-style keys; ModernBERT's feed-forward is a GLU (its input
    projection is 2 x intermediate_size wide). DeBERTa's c2p/p2c terms are not
    counted (an under-estimate for it)."""
    def key(*names):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return None

    d = key("hidden_size", "dim", "n_embd")
    layers = key("num_hidden_layers", "n_layers", "n_layer")
    ffn = key("intermediate_size", "hidden_dim", "n_inner") or 4 * d
    model_type = key("model_type")
    glu = model_type == "modernbert"
    per_layer = 4 * d * d + (3 if glu else 2) * d * ffn
    transform = 0 if model_type == "gpt2" else d * d  # GPT-2's head has no transform
    dense = layers * per_layer + transform
    spans = [block] * layers
    if model_type == "modernbert":
        every = key("global_attn_every_n_layers") or 1
        local = min(block, (key("local_attention") or block) + 1)
        spans = [block if i % every == 0 else local for i in range(layers)]
    head_share = 1.0 if objective == "clm" else mlm_probability
    return 6 * dense + 12 * d * sum(spans) + 6 * d * cfg.vocab_size * head_share


def guess_peak_tflops(device, precision, tf32=True):
    import torch

    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    bf16 = precision == "bf16"
    # Dense (no sparsity) peaks: bf16 and TF32 on tensor cores, fp32 without them.
    table = [("H200", 989.0, 494.7, 67.0), ("H100 PCIe", 756.0, 378.0, 51.0), ("H100", 989.0, 494.7, 67.0),
             ("A100", 312.0, 156.0, 19.5), ("L40S", 362.0, 183.0, 91.6)]
    for key, bf, tf, fp in table:
        if key in name:
            return bf if bf16 else (tf if tf32 else fp)
    return 0.0


def main():
    a = parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast, default_data_collator

    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    else:
        torch.set_float32_matmul_precision("high" if a.tf32 == "on" else "highest")

    t0 = time.perf_counter()
    clm = a.objective == "clm"
    blocks, n_docs = read_blocks(a.files, a.tokenizer, a.block, special_tokens=not clm)
    need = (a.warmup + a.steps) * a.batch
    if len(blocks) < need:
        # Cycle the corpus rather than fail: the throughput does not depend on it.
        blocks = (blocks * (need // max(len(blocks), 1) + 1))[:max(need, len(blocks))]
    tokenize_s = time.perf_counter() - t0

    if clm:
        # run_clm: group_texts copies input_ids to labels (the model shifts them),
        # the tokenizer's all-ones attention_mask rides along, default_data_collator.
        def collator(rows):
            return default_data_collator(
                [{"input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                  "labels": list(r["input_ids"])} for r in rows])
    else:
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=a.tokenizer, unk_token="[UNK]", sep_token="[SEP]",
                                         pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
        collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15)

    cfg = AutoConfig.from_pretrained(a.config)
    model = (AutoModelForCausalLM if clm else AutoModelForMaskedLM).from_config(cfg).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=a.lr, fused=True)
        opt_kind = "fused"
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=a.lr, foreach=True)
        opt_kind = "foreach"
    total = a.warmup + a.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # On CPU the phases are synchronous anyway; on CUDA a sync between phases would
    # stop the host from queueing kernels ahead, so it is opt-in.
    phase_sync = sync if device.type == "cpu" or a.phase_times else (lambda: None)
    timed_phases = device.type == "cpu" or a.phase_times

    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    losses = []
    step_times = []
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(a.seed)).tolist()
    start = None
    for step in range(total):
        if step == a.warmup:
            sync()
            start = time.perf_counter()
            phases = dict.fromkeys(phases, 0.0)
        ta = time.perf_counter()
        rows = [{"input_ids": blocks[order[(step * a.batch + i) % len(order)]]} for i in range(a.batch)]
        batch = {k: v.to(device, non_blocking=True) for k, v in collator(rows).items()}
        tb = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        phase_sync()
        tc = time.perf_counter()
        loss.backward()
        phase_sync()
        td = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        phase_sync()
        te = time.perf_counter()
        for k, dt in zip(phases, (tb - ta, tc - tb, td - tc, te - td)):
            phases[k] += dt
        if step >= a.warmup and timed_phases:
            step_times.append(te - ta)
        losses.append(loss.detach())
    sync()
    elapsed = time.perf_counter() - start
    step_s = elapsed / a.steps
    tokens_per_s = a.batch * a.block / step_s
    flops = model_flops_per_token(cfg, a.block, objective=a.objective)
    peak = a.peak_tflops or guess_peak_tflops(device, a.precision, a.tf32 == "on")
    out = {
        "impl": "transformers+torch",
        "model_type": cfg.model_type,
        "objective": a.objective,
        "model_class": type(model).__name__,
        "parameters": n_params,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": a.precision,
        "threads": torch.get_num_threads(),
        "optimizer": f"AdamW({opt_kind})",
        "block": a.block,
        "batch": a.batch,
        "steps": a.steps,
        "warmup": a.warmup,
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        # Each timed step's wall time where the phases are synchronised (the CPU),
        # for a median that one slow step on a shared machine does not move.
        "step_times_s": step_times if timed_phases else None,
        **({f"time_{k}_s": v / a.steps for k, v in phases.items()} if timed_phases else {}),
        "data_fraction": phases["data"] / elapsed if timed_phases else None,
        "flops_per_token": flops,
        "mfu": (tokens_per_s * flops / (peak * 1e12)) if peak else None,
        "peak_tflops": peak or None,
        "last_loss": float(losses[-1].float()),
        "corpus_documents": n_docs,
        "corpus_blocks": len(blocks),
        "setup_tokenize_s": tokenize_s,
        "torch": torch.__version__,
    }
    if not math.isfinite(out["last_loss"]):
        print("reference_train: non-finite loss", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
