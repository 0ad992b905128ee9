"""Reference GPT-2 models, logits, losses and gradients for tests/parity_gpt2.rs.

Usage: make_gpt2.py OUT_DIR
       make_gpt2.py --check JOBS_JSON REFERENCE_SAFETENSORS

The first form writes into OUT_DIR:
  gpt2/          small random-init GPT2LMHeadModel (save_pretrained: config.json,
                 model.safetensors, generation_config.json), gelu_new, scaled
                 attention, n_inner null; tokenizer.json + tokenizer_config.json
  gpt2_variant/  the same sizes with n_inner 48, scale_attn_weights false,
                 activation_function "gelu"; the same tokenizer
  gpt2_hub/      gpt2/'s weights as the Hub's gpt2 and distilgpt2 files hold them:
                 a GPT2Model state dict (no `transformer.` prefix) with each
                 layer's old `attn.bias` / `attn.masked_bias` buffers, written by
                 torch.save as pytorch_model.bin; config.json; the tokenizer
  reference.safetensors:
    input_ids                       [2, 12] i64, no padding
    pad_input_ids, pad_attention_mask   [3, 12] i64, rows of 12, 7, 4 tokens padded
                                    on the right with <|endoftext|> (mask 0)
    {name}_logits, {name}_pad_logits    f32, eval mode, for gpt2 and gpt2_variant
    {name}_loss                     [] f32: GPT2LMHeadModel(input_ids, labels=input_ids).loss
  grads/{name}.safetensors   d(loss)/d(tensor) under the names model.safetensors holds

The tokenizer is a byte-level BPE of 300 tokens trained here (GPT-2's
pre-tokenizer ByteLevel(add_prefix_space=False), its decoder, the special
token <|endoftext|>, id 0, which is also bos/eos).

The second form loads each [MODEL_DIR, OUT_SAFETENSORS] of JOBS_JSON in
AutoModelForCausalLM, asserts that transformers reports no missing, unexpected
or mismatched keys, and writes `logits` and `pad_logits` of the reference
batches to OUT; a directory that fails writes its message to OUT + ".error".
"""
import glob
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

CORPUS = sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"))[:6]
VOCAB = 300
SEQ = 12
PAD_LENGTHS = [12, 7, 4]
SIZES = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)


def tokenizer(out):
    """GPT-2's byte-level BPE, small: 256 bytes, <|endoftext|> and the merges up to VOCAB."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(CORPUS, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    save_tokenizer(tok, out)
    return tok


def save_tokenizer(tok, out):
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "model_max_length": SIZES["n_positions"],
        }, f, indent=2)


def perturb(model):
    """Random-init biases and LayerNorms are 0/1; perturb them so the tests see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)


def batches(eos):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    pad_ids = torch.full((len(PAD_LENGTHS), SEQ), eos, dtype=torch.long)
    pad_mask = torch.zeros(len(PAD_LENGTHS), SEQ, dtype=torch.long)
    for r, n in enumerate(PAD_LENGTHS):
        pad_ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        pad_mask[r, :n] = 1
    return ids, pad_ids, pad_mask


def logits_of(model, ref):
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float().contiguous()
        pad = model(input_ids=ref["pad_input_ids"], attention_mask=ref["pad_attention_mask"]).logits
    return logits, pad.float().contiguous()


def save_grads(model, model_dir, path):
    """The gradient of each tensor model.safetensors holds, under that name."""
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    grads = {}
    for name in names:
        p = model.get_parameter(name)
        grads[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).float().contiguous()
    save_file(grads, path)


def hub_style(model, out, tok_dir):
    """The state dict of `model.transformer` (a GPT2Model), with the causal-mask
    buffers old versions of transformers kept in every layer, via torch.save."""
    os.makedirs(out, exist_ok=True)
    state = dict(model.transformer.state_dict())
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, os.path.join(out, "pytorch_model.bin"))
    model.config.to_json_file(os.path.join(out, "config.json"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), out)


def main(out):
    os.makedirs(os.path.join(out, "grads"), exist_ok=True)
    tok = tokenizer(os.path.join(out, "gpt2"))
    eos = tok.token_to_id("<|endoftext|>")
    ids, pad_ids, pad_mask = batches(eos)
    ref = {"input_ids": ids, "pad_input_ids": pad_ids, "pad_attention_mask": pad_mask}
    variants = {
        "gpt2": {},
        "gpt2_variant": dict(n_inner=48, scale_attn_weights=False, activation_function="gelu"),
    }
    for seed, (name, extra) in enumerate(variants.items()):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=VOCAB, bos_token_id=eos, eos_token_id=eos, **SIZES, **extra)
        model = GPT2LMHeadModel(config).eval()
        perturb(model)
        ref[f"{name}_logits"], ref[f"{name}_pad_logits"] = logits_of(model, ref)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        ref[f"{name}_loss"] = loss.detach().float()
        d = os.path.join(out, name)
        model.save_pretrained(d)
        if name != "gpt2":
            save_tokenizer(tok, d)
        save_grads(model, d, os.path.join(out, "grads", f"{name}.safetensors"))
        if name == "gpt2":
            hub_style(model, os.path.join(out, "gpt2_hub"), d)
    save_file(ref, os.path.join(out, "reference.safetensors"))


def check(model_dir, reference, out):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and len(v) > 0}
    problems.update({"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if problems:
        sys.exit(f"{model_dir}: transformers reported {json.dumps(problems)}")
    logits, pad = logits_of(model.eval(), load_file(reference))
    save_file({"logits": logits, "pad_logits": pad}, out)
    print(f"{type(model).__name__} loaded cleanly from {model_dir}")


def check_jobs(jobs_json, reference):
    with open(jobs_json) as f:
        todo = json.load(f)
    for model_dir, out in todo:
        try:
            check(model_dir, reference, out)
        except BaseException as e:  # noqa: BLE001 - reported to the Rust test
            with open(out + ".error", "w") as f:
                f.write(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    if sys.argv[1] == "--check":
        check_jobs(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1])
