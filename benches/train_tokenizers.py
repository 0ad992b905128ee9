#!/usr/bin/env python3
"""Trains the two tokenizer.json files the Unigram and byte-level BPE fast paths
are tested and measured on (no model hub here, so no real DeBERTa-v3 or RoBERTa
file): both shaped like the real ones, trained with `tokenizers` on local text.

    train_tokenizers.py OUT_DIR [--vocab 8000]

writes OUT_DIR/deberta-v3-like/tokenizer.json and OUT_DIR/roberta-like/tokenizer.json
(skipped when present):

- deberta-v3-like: Unigram; normalizer Sequence[Strip, Replace("``" -> '"'), NFKC,
  Replace(Regex(" {2,}") -> " ")] (DeBERTa-v3's is Strip, Precompiled(nmt_nfkc),
  the same Replace; Precompiled needs sentencepiece's charsmap, so NFKC stands in);
  pre-tokenizer Metaspace("▁", prepend_scheme "always", split); special tokens
  [PAD] [CLS] [SEP] [UNK] [MASK]; template "[CLS] $A [SEP]".
- roberta-like: BPE over the ByteLevel alphabet; pre-tokenizer ByteLevel
  (add_prefix_space false, GPT-2 regex); special tokens <s> <pad> </s> <unk>
  <mask> (lstrip, as RoBERTa's); RobertaProcessing.

Corpus: the Python documentation reST sources (the demo corpus), the licences in
/usr/share/common-licenses and /usr/share/doc/*/*.txt, capped at --max-mb.
"""
import argparse
import glob
import os


def corpus_files():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for docs in [os.path.join(root, "data/corpus/python-docs"), "/usr/share/doc/python3.11/html/_sources"]:
        if os.path.isdir(os.path.join(docs, "tutorial")):
            break
    files = sorted(glob.glob(os.path.join(docs, "**/*.rst.txt"), recursive=True))
    files += sorted(p for p in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(p))
    files += sorted(glob.glob("/usr/share/doc/*/*.txt"))
    return files


def lines(max_bytes):
    seen = 0
    for f in corpus_files():
        try:
            text = open(f, encoding="utf-8").read()
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            if line.strip():
                seen += len(line)
                yield line
            if seen > max_bytes:
                return


def train_unigram(out, vocab, max_bytes):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([
        normalizers.Strip(),
        normalizers.Replace("``", '"'),
        normalizers.NFKC(),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=[AddedToken(s, normalized=False)
                                                                        for s in specials], unk_token="[UNK]")
    tok.train_from_iterator(lines(max_bytes), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(out)


def train_bpe(out, vocab, max_bytes):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", AddedToken("<mask>", lstrip=True, normalized=False)]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines(max_bytes), trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")))
    tok.save(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max-mb", type=float, default=6.0)
    a = p.parse_args()
    max_bytes = int(a.max_mb * 1e6)
    for name, train in [("deberta-v3-like", train_unigram), ("roberta-like", train_bpe)]:
        path = os.path.join(a.out_dir, name, "tokenizer.json")
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        train(tmp, a.vocab, max_bytes)
        os.replace(tmp, path)
        print(path)


if __name__ == "__main__":
    main()
