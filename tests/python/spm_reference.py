"""A DeBERTa-v3-style folder with only a SentencePiece tokenizer, and its reference ids.

usage: spm_reference.py OUT_DIR TEXTS_JSON

Trains a Unigram SentencePiece model (spm.model, nmt_nfkc normalisation, a dummy
prefix; ids 0-3 [PAD] [CLS] [SEP] [UNK] as in microsoft/deberta-v3-*) on the
demo corpus, writes tokenizer_config.json and added_tokens.json ([MASK] after
the pieces) as the Hub's DeBERTa-v3 folders have them, and writes
OUT_DIR/reference.json: for each text of TEXTS_JSON (a list of strings), the ids
of sentencepiece itself wrapped in [CLS] ... [SEP] ("spm"; [MASK] matched first,
as the slow DebertaV2Tokenizer does), and of transformers' AutoTokenizer loading
the folder ("hf").
"""
import glob
import json
import os
import sys

import sentencepiece as spm
from transformers import AutoTokenizer

out, texts_path = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
files = sorted(glob.glob("/usr/share/doc/python3.11/html/_sources/tutorial/*.rst.txt"))
spm.SentencePieceTrainer.train(
    input=",".join(files), model_prefix=os.path.join(out, "spm"), vocab_size=2000, model_type="unigram",
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
    unk_piece="[UNK]", character_coverage=0.9995, minloglevel=2,
)
os.remove(os.path.join(out, "spm.vocab"))
sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
n = sp.get_piece_size()
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": False, "vocab_type": "spm", "split_by_punct": False,
               "tokenizer_class": "DebertaV2Tokenizer"}, f)
with open(os.path.join(out, "added_tokens.json"), "w") as f:
    json.dump({"[MASK]": n}, f)
with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"model_type": "deberta-v2", "vocab_size": n + 1}, f)
texts = json.load(open(texts_path))
hf = AutoTokenizer.from_pretrained(out)


def spm_ids(text):
    """sentencepiece's ids, with [MASK] (unknown to it) matched first, as the
    slow DebertaV2Tokenizer splits on its special tokens."""
    ids = []
    for i, part in enumerate(text.split("[MASK]")):
        if i:
            ids.append(n)
        ids += sp.encode(part)
    return ids


reference = {
    "mask_id": n,
    "spm": [[1] + spm_ids(t) + [2] for t in texts],
    "hf": [hf(t)["input_ids"] for t in texts],
}
os.remove(os.path.join(out, "config.json"))
with open(os.path.join(out, "reference.json"), "w") as f:
    json.dump(reference, f)
