"""Small random-init ModernBertForMaskedLM models and their outputs, for tests/parity_modernbert.rs.

Usage: make_modernbert.py OUT_DIR

Writes into OUT_DIR:
  tokenizer/    a tiny byte-level BPE with ModernBERT's special tokens
                ([UNK] [CLS] [SEP] [PAD] [MASK], `[CLS] $A [SEP]`), trained here
  modernbert/   4 layers, hidden 48, global every 2nd layer, a window of 8
                (4 tokens on each side) shorter than the 40-token block,
                rope thetas 1000 / 50, no biases; config.json as transformers 5
                writes it (`layer_types`, `rope_parameters`)
  modernbert_hub/  the same weights, config.json in the Hub's form
                (`global_attn_every_n_layers`, `global_rope_theta`,
                `local_rope_theta`, `local_attention`)
  modernbert_bias/ 3 layers, global every 3rd, every bias on (norm, attention,
                mlp, classifier), no decoder bias, tanh GELU
  reference.safetensors:
    input_ids, attention_mask, labels   [3, 40] i64, rows of 40, 29, 12 tokens
    full_input_ids, full_labels         [2, 40]: no padding
    {name}_logits, {name}_full_logits   eval-mode logits f32
  grads/{name}.safetensors   d(masked cross-entropy)/d(parameter) on the padded
                batch, under the names model.safetensors holds
  fill_mask/modernbert.jsonl   HF's fill-mask pipeline, top 5, on FILL_MASK_TEXT
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ModernBertConfig, ModernBertForMaskedLM, pipeline

sys.path.insert(0, os.path.dirname(__file__))
from make_models import CORPUS, batch, logits_and_grads, save_grads  # noqa: E402

SEQ = 40
LENGTHS = [40, 29, 12]
FILL_MASK_TEXT = "The capital of France is [MASK]."


def tokenizer(out, vocab_size):
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(CORPUS, trainer)
    tok.add_special_tokens([AddedToken("[MASK]", lstrip=True, special=True, normalized=False)])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "unk_token": "[UNK]", "pad_token": "[PAD]", "mask_token": "[MASK]",
            "clean_up_tokenization_spaces": False, "model_max_length": 64,
        }, f, indent=2)
    return tok


def perturb(model):
    """Norms start at 1 and biases at 0: perturb them so the tests see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def copy_tokenizer(src, dst):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), dst)


def write_config(d, update, drop):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key in drop:
        config.pop(key, None)
    config.update(update)
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def main(out):
    os.makedirs(os.path.join(out, "grads"), exist_ok=True)
    tdir = os.path.join(out, "tokenizer")
    tok = tokenizer(tdir, 600)
    vocab = tok.get_vocab_size()
    ids_of = {t: tok.token_to_id(t) for t in ["[CLS]", "[SEP]", "[PAD]", "[MASK]"]}
    ids, mask, labels = batch(vocab, SEQ, LENGTHS, cls=ids_of["[CLS]"], sep=ids_of["[SEP]"],
                              pad=ids_of["[PAD]"], first_id=5, seed=7)
    full_ids, _, full_labels = batch(vocab, SEQ, [SEQ, SEQ], cls=ids_of["[CLS]"], sep=ids_of["[SEP]"],
                                     pad=ids_of["[PAD]"], first_id=5, seed=8)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels,
           "full_input_ids": full_ids, "full_labels": full_labels}
    special = dict(pad_token_id=ids_of["[PAD]"], cls_token_id=ids_of["[CLS]"], sep_token_id=ids_of["[SEP]"],
                   bos_token_id=ids_of["[CLS]"], eos_token_id=ids_of["[SEP]"])
    configs = {
        "modernbert": dict(
            vocab_size=vocab, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=64, local_attention=8,
            global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=50.0, **special,
        ),
        "modernbert_bias": dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=64, local_attention=8,
            global_attn_every_n_layers=3, norm_bias=True, attention_bias=True, mlp_bias=True,
            classifier_bias=True, decoder_bias=False, hidden_activation="gelu_pytorch_tanh",
            classifier_activation="gelu_new", **special,
        ),
    }
    for seed, (name, kwargs) in enumerate(configs.items()):
        torch.manual_seed(10 + seed)
        model = ModernBertForMaskedLM(ModernBertConfig(**kwargs, attn_implementation="sdpa"))
        perturb(model)
        model.eval()
        with torch.no_grad():
            ref[name + "_full_logits"] = model(input_ids=full_ids).logits.float().contiguous()
        ref[name + "_logits"] = logits_and_grads(model, ids, mask, labels)
        d = os.path.join(out, name)
        model.save_pretrained(d)
        copy_tokenizer(tdir, d)
        save_grads(model, d, os.path.join(out, "grads", name + ".safetensors"))

    # transformers 5's form only in modernbert/, the Hub's form only in modernbert_hub/.
    src, hub = os.path.join(out, "modernbert"), os.path.join(out, "modernbert_hub")
    shutil.copytree(src, hub)
    c = configs["modernbert"]
    write_config(src, {}, ["global_attn_every_n_layers", "global_rope_theta", "local_rope_theta"])
    write_config(hub, {k: c[k] for k in ["global_attn_every_n_layers", "global_rope_theta", "local_rope_theta",
                                         "local_attention"]}, ["layer_types", "rope_parameters"])
    for d in (src, hub):
        with torch.no_grad():
            again = ModernBertForMaskedLM.from_pretrained(d).eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(again, ref["modernbert_logits"], atol=1e-6), d

    os.makedirs(os.path.join(out, "fill_mask"), exist_ok=True)
    pipe = pipeline("fill-mask", model=src, tokenizer=src, device="cpu")
    with open(os.path.join(out, "fill_mask", "modernbert.jsonl"), "w") as f:
        for r in pipe(FILL_MASK_TEXT, top_k=5):
            f.write(json.dumps(r) + "\n")

    save_file(ref, os.path.join(out, "reference.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
