"""PyTorch reference for tests/golden.rs: the training steps of `mlm train`, in torch.

Usage: golden_reference.py BATCHES OUT_JSON FP32_JOB BF16_JOB FP16_JOB RESUME_STEP MISTAKE_STEPS
       golden_reference.py clm BATCHES OUT_JSON FP32_JOB BF16_JOB MISTAKE_STEPS

Trains each job's `model.path` (a BertForMaskedLM without dropout, loaded with
from_pretrained) with the job's [training] settings on the pre-masked micro-batches
in BATCHES (safetensors: input_ids, labels [steps, accum, rows, block] i64, -100
where nothing is predicted), and writes the per-step loss, lr and gradient norm of
each job as JSON: {"fp32": [...], "bf16": [...], "fp16": [...], "mistakes": {...}}.

One optimizer step, as the Hugging Face Trainer takes it and as src/train/ claims to:
  - loss: the cross-entropy summed over the masked positions of all the step's
    micro-batches, divided by the step's masked tokens; the gradients of the
    micro-batches accumulate (Trainer::forward_backward);
  - torch.nn.utils.clip_grad_norm_(max_grad_norm); the norm before clipping is logged;
  - torch.optim.AdamW in two groups: weight decay except on biases and LayerNorm
    weights (MaskedLm::no_decay; the Trainer's grouping);
  - get_linear_schedule_with_warmup: the lr of step k is read before its update;
  - decoder weight tied to the word embeddings, decoder bias to cls.predictions.bias,
    as transformers ties them;
  - precision = "bf16": forward and backward run on a bf16 copy of the fp32 master
    model, its gradients accumulate in fp32 on the master, and after each update the
    copy is refreshed from the master (round to nearest even);
  - precision = "fp16": the same on an fp16 copy, with torch.amp.GradScaler (the job's
    [training.loss_scale]) as the Trainer runs it: each micro-batch's loss scaled before
    backward, unscale_ before clipping, scaler.step and update; the scheduler steps only
    when the optimizer did (the Trainer's `optimizer_step_was_skipped`: the scale fell).
    Each step also logs the scale after the update.
The MLM head (`model.cls`) runs only at the masked positions: it is position-wise, so
the loss and gradients are those of the full forward, at a seventh of the cost.

With `clm` first, the jobs train a GPT2LMHeadModel (a causal LM: BATCHES' labels are
each block's next tokens, -100 at its last position; the head `lm_head`, tied to
`transformer.wte`, runs at the predicted positions), in fp32 and bf16 only; the loss is
the next-token cross-entropy summed over the step's predicted tokens and divided by
their count, and the weight-decay groups are the Trainer's (no decay for biases and
the LayerNorms `ln_1`, `ln_2`, `ln_f`).

`mistakes` holds the losses of the first MISTAKE_STEPS steps replayed with one
deliberate mistake each: weight decay on every parameter, no clipping, the schedule
one step ahead, the loss averaged per micro-batch, AdamW's step count restarted
after RESUME_STEP steps (as a resume that lost it would), and (bf16) the compute
copy refreshed before the update instead of after it, and (fp16) the scheduler
stepped on skipped steps too; for GPT-2: labels that are the inputs themselves (no
shift), weight decay on the LayerNorm weights. The test asserts that each
misses the reference by far more than its tolerance, so the comparison could catch it.
"""
import copy
import json
import math
import sys
import tomllib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertForMaskedLM, GPT2LMHeadModel, get_linear_schedule_with_warmup

FP32_MISTAKES = [
    "decay_everything",
    "no_clipping",
    "schedule_one_step_ahead",
    "mean_per_micro_batch",
    "adam_step_restarts",
]
BF16_MISTAKES = ["bf16_copy_refreshed_before_the_update"]
FP16_MISTAKES = ["schedule_steps_on_skipped_steps"]
CLM_MISTAKES = ["no_shift", "decay_layer_norms"]


def no_decay(name):
    return name.endswith("bias") or "LayerNorm." in name or ".ln_" in name


def load(job):
    """The job's model, its body and its head (run at the predicted positions)."""
    path = job["model"]["path"]
    with open(path + "/config.json") as f:
        causal = json.load(f)["model_type"] == "gpt2"
    if causal:  # the attention written out, as `mlm` computes it on the CPU
        model, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    else:
        model, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), f"the model loads with {info}"
    return model.float().train()


def parts(model):
    """(body(ids) -> hidden states, head(hidden) -> logits) of a BERT or GPT-2."""
    if isinstance(model, GPT2LMHeadModel):
        return (lambda x: model.transformer(input_ids=x).last_hidden_state), model.lm_head
    return (lambda x: model.bert(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state), model.cls


def replay(job, batches, mistake=None, resume_step=None, steps=None):
    t = job["training"]
    assert t.get("schedule", "linear") == "linear" and t["warmup_steps"] > 0, "the job this script mirrors"
    master = load(job)
    precision = t.get("precision", "fp32")
    shadow = precision in ("bf16", "fp16")  # a compute copy, refreshed after each update
    kind = torch.float16 if precision == "fp16" else torch.bfloat16
    compute = copy.deepcopy(master).to(kind) if shadow else master
    scaler = None
    if precision == "fp16":
        ls = t.get("loss_scale", {})
        scaler = torch.amp.GradScaler(
            "cpu",
            init_scale=ls.get("init_scale", 2.0**16),
            growth_factor=ls.get("growth_factor", 2.0),
            backoff_factor=ls.get("backoff_factor", 0.5),
            growth_interval=ls.get("growth_interval", 2000),
        )
    named = list(master.named_parameters())  # tied parameters appear once
    params = [p for _, p in named]
    compute_params = [p for _, p in compute.named_parameters()]

    def decays(name):
        if mistake == "decay_layer_norms":
            return not name.endswith("bias")
        return mistake == "decay_everything" or not no_decay(name)

    groups = [
        {"params": [p for n, p in named if decays(n)], "weight_decay": t["weight_decay"]},
        {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0},
    ]
    betas = (t.get("adam_beta1", 0.9), t.get("adam_beta2", 0.999))
    opt = torch.optim.AdamW(groups, lr=t["lr"], betas=betas, eps=t.get("adam_eps", 1e-8))
    sched = get_linear_schedule_with_warmup(opt, t["warmup_steps"], t["max_steps"])
    if mistake == "schedule_one_step_ahead":
        sched.step()
    max_norm = math.inf if mistake == "no_clipping" else t["max_grad_norm"]

    def refresh_compute_copy():
        with torch.no_grad():
            for c, p in zip(compute_params, params):
                c.copy_(p)

    ids, labels = batches["input_ids"], batches["labels"]
    if mistake == "no_shift":
        labels = torch.where(labels == -100, labels, ids)
    body, head = parts(compute)
    out = []
    for k in range(steps or t["max_steps"]):
        n_masked = (labels[k] != -100).sum()
        total = torch.zeros(())
        for x, y in zip(ids[k], labels[k]):
            hidden = body(x)
            picked = y != -100
            logits = head(hidden[picked]).float()
            loss = F.cross_entropy(logits, y[picked], reduction="sum")
            if mistake == "mean_per_micro_batch":
                loss = loss / picked.sum() / ids.shape[1]
            else:
                loss = loss / n_masked
            grads = torch.autograd.grad(scaler.scale(loss) if scaler else loss, compute_params)
            for p, g in zip(params, grads):
                p.grad = g.float() if p.grad is None else p.grad + g.float()
            total += loss.detach()
        if scaler:
            scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        lr = opt.param_groups[0]["lr"]
        if mistake == "adam_step_restarts" and k == resume_step:
            for state in opt.state.values():
                state["step"].zero_()
        if shadow and mistake == "bf16_copy_refreshed_before_the_update":
            refresh_compute_copy()
        skipped = False
        if scaler:
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped = scaler.get_scale() < before
        else:
            opt.step()
        if shadow and mistake != "bf16_copy_refreshed_before_the_update":
            refresh_compute_copy()
        if not skipped or mistake == "schedule_steps_on_skipped_steps":
            sched.step()
        opt.zero_grad(set_to_none=True)
        gn = grad_norm.item()  # inf on an overflowed fp16 step: null, as mlm's metrics write it
        record = {"step": k + 1, "loss": total.item(), "lr": lr, "grad_norm": gn if math.isfinite(gn) else None}
        if scaler:
            record["loss_scale"] = scaler.get_scale()
            record["skipped"] = skipped
        out.append(record)
    return out


def main():
    torch.set_num_threads(1)  # beside the `mlm` jobs, on two cores
    if sys.argv[1] == "clm":
        return main_clm(*sys.argv[2:])
    batches_file, out_json, fp32_toml, bf16_toml, fp16_toml, resume_step, mistake_steps = sys.argv[1:]
    jobs = {}
    for name, path in [("fp32", fp32_toml), ("bf16", bf16_toml), ("fp16", fp16_toml)]:
        with open(path, "rb") as f:
            jobs[name] = tomllib.load(f)
    batches = load_file(batches_file)
    result = {name: replay(job, batches) for name, job in jobs.items()}
    mistakes = [(m, jobs["fp32"]) for m in FP32_MISTAKES] + [(m, jobs["bf16"]) for m in BF16_MISTAKES]
    mistakes += [(m, jobs["fp16"]) for m in FP16_MISTAKES]
    result["mistakes"] = {
        m: [s["loss"] for s in replay(job, batches, m, int(resume_step), int(mistake_steps))] for m, job in mistakes
    }
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)


def main_clm(batches_file, out_json, fp32_toml, bf16_toml, mistake_steps):
    jobs = {}
    for name, path in [("fp32", fp32_toml), ("bf16", bf16_toml)]:
        with open(path, "rb") as f:
            jobs[name] = tomllib.load(f)
    batches = load_file(batches_file)
    result = {name: replay(job, batches) for name, job in jobs.items()}
    result["mistakes"] = {m: [s["loss"] for s in replay(jobs["fp32"], batches, m, None, int(mistake_steps))] for m in CLM_MISTAKES}
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
