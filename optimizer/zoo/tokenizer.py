"""A small CLIP BPE tokenizer for the zoo, built offline and deterministically.

The files are in the exact format of ``openai/clip-vit-large-patch14``'s tokenizer (byte-level
``vocab.json`` with ``</w>`` word ends, ``merges.txt``), so ``transformers.CLIPTokenizer`` and
diffusers' pipelines load them unchanged; only the vocabulary is small: the 256 byte symbols (plain
and word-final), every word of the domain's captions with its merge chain, and the two special
tokens. Any text still tokenizes (unknown words fall back to byte symbols), and domain words are
short token sequences.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from optimizer.zoo import domain

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 77


@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def domain_words() -> list[str]:
    """Every word that appears in a domain caption, sorted."""
    words = {"a", "digit", "on", "background"}
    words |= {str(d) for d in domain.DIGITS}
    words |= set(domain.FOREGROUNDS) | set(domain.BACKGROUNDS) | set(domain.THICKNESSES) | set(domain.SLANTS)
    return sorted(words)


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the zoo tokenizer."""
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    for word in domain_words():
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in tokens:
                tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | os.PathLike[str]) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def vocab_size() -> int:
    return len(vocabulary()[0])


def load_tokenizer(folder: str | os.PathLike[str] | None = None):
    """A ``transformers.CLIPTokenizer`` for the zoo (written to a temporary folder when none given)."""
    import tempfile

    from transformers import CLIPTokenizer

    if folder is None:
        folder = write_tokenizer(Path(tempfile.mkdtemp(prefix="evomerge-tokenizer-")))
    return CLIPTokenizer.from_pretrained(str(folder))
