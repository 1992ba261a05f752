"""The world's two small tokenizers, saved so `AutoTokenizer.from_pretrained(dir)` loads them.

- A GPT-2-style byte-level BPE trained on the world's captions and the prompt template. Its first 256 ids
  are the 256 byte symbols in GPT-2's order, so as in GPT-2 the pad token `!` is id 0, the end token `.`
  is id 13 and a lone space is id 220; merged tokens follow in merge order, then `<|endoftext|>`.
- A CLIP tokenizer that is the real CLIP BPE cut down to the merges the world's words use: it splits every
  world caption exactly as CLIP's tokenizer does, with a vocabulary of hundreds instead of 49,408.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

GPT2_END_OF_TEXT = "<|endoftext|>"
CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in GPT-2's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def train_gpt2_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                         model_max_length: int = 256):
    """Train a byte-level BPE on `texts`, write GPT-2-format files to `out_dir` and return the loaded tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    # Ids: bytes in GPT-2 order, then each merge's result in merge order, then the end-of-text token.
    return _save_bpe(out_dir, list(bytes_to_unicode().values()), merges, [GPT2_END_OF_TEXT], GPT2Tokenizer,
                     model_max_length)


def _save_bpe(out_dir: str | Path, base: list[str], merges: list[tuple[str, str]], specials: list[str],
              tokenizer_class, model_max_length: int):
    """Write `vocab.json` (ids: `base`, then each merge's result in merge order, then `specials`) and
    `merges.txt` to `out_dir`, load them with `tokenizer_class`, save its own files there too; return it."""
    vocab = {token: i for i, token in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in specials:
        vocab[token] = len(vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("\n".join([MERGES_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n",
                                        encoding="utf-8")
    loaded = tokenizer_class.from_pretrained(out_dir, model_max_length=model_max_length)
    loaded.save_pretrained(out_dir)
    return loaded


# CLIP's pre-tokenisation of lowercased text (see CLIPTokenizer): letters, single digits, other symbols.
_CLIP_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def _bpe_merges_used(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges CLIP's BPE applies to one pre-token (characters, the last one with `</w>`)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = set()
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


def prune_clip_tokenizer(full_dir: str | Path, texts: Iterable[str], out_dir: str | Path,
                         model_max_length: int = 77):
    """Write a CLIP tokenizer keeping only the merges `texts` need, plus all 512 byte symbols; return it loaded."""
    from transformers import CLIPTokenizer

    full_dir = Path(full_dir)
    full_vocab = json.loads((full_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (full_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    byte_encoder = bytes_to_unicode()
    used: set[tuple[str, str]] = set()
    for word in {w for text in texts for w in _CLIP_WORDS.findall(text.lower())}:
        used |= _bpe_merges_used("".join(byte_encoder[b] for b in word.encode("utf-8")), ranks)
    kept_merges = [pair for pair in merges if pair in used]
    base = sorted(full_vocab, key=full_vocab.__getitem__)[:512]  # CLIP's bytes, then bytes + "</w>"
    return _save_bpe(out_dir, base, kept_merges, list(CLIP_SPECIAL_TOKENS), CLIPTokenizer, model_max_length)
