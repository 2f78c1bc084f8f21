"""An offline CLIP tokenizer whose every world word is exactly one token.

SD's tokenizer is CLIP's byte-level BPE: a ``vocab.json`` (token -> id) and a ``merges.txt``
(pairs, applied lowest rank first). We cannot download CLIP's, so we write our own: the 256
byte symbols (alone and with the end-of-word mark ``</w>``), then for every word a chain of
merges that builds it left to right. Any other text still tokenizes, byte by byte.

Why the repair loop: merges are global. The chain for "triangle" contains ``t r``; applied to
"stripe" it fires before ``s t`` (lower rank) and leaves ``s tr i p e</w>``, which no merge
joins. We therefore encode every word, and where it does not come out as one token we append
the merge that joins its first two pieces, until every word is one token.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hfi_core.toyworld.render import COLORS, PHRASES, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 20  # longest world caption is 11 tokens with BOS/EOS; room for a soft token


def world_words() -> list[str]:
    """Every word the world's captions use, sorted."""
    words = {"a", *SHAPES, *COLORS}
    for phrase in PHRASES:
        words.update(phrase.split())
    return sorted(words)


def _chain(word: str) -> list[tuple[str, str]]:
    """Merges that build ``word + </w>`` from its characters, left to right."""
    symbols = list(word[:-1]) + [word[-1] + EOW]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def _make(vocab: dict[str, int], merges: list[tuple[str, str]], directory: Path) -> CLIPTokenizer:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    # transformers 5 builds the fast (tokenizers) backend from the two files in a folder.
    return CLIPTokenizer.from_pretrained(
        str(directory),
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,  # as in SD v1.4's tokenizer
    )


def build_tokenizer(directory: Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` and save a ``CLIPTokenizer`` into ``directory``.

    Raises:
        RuntimeError: if some word still does not encode as one token after the repair loop.
    """
    words = sorted(set(words or world_words()))
    byte_symbols = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for w in words:
        for m in _chain(w):
            if m not in merges:
                merges.append(m)

    def vocab_for(merges: list[tuple[str, str]]) -> dict[str, int]:
        tokens = byte_symbols + [s + EOW for s in byte_symbols] + [a + b for a, b in merges]
        tokens += [BOS, EOS]
        vocab: dict[str, int] = {}
        for t in tokens:
            vocab.setdefault(t, len(vocab))
        return vocab

    tmp = directory / ".build"
    for _ in range(10 * len(words)):
        tok = _make(vocab_for(merges), merges, tmp)
        broken = [(w, tok.tokenize(w)) for w in words if len(tok.tokenize(w)) != 1]
        if not broken:
            break
        for _word, pieces in broken:
            m = (pieces[0], pieces[1])
            if m not in merges:
                merges.append(m)
    else:
        raise RuntimeError(f"tokenizer: these words are still split: {broken}")
    tok.save_pretrained(str(directory))
    # Keep the two plain files beside tokenizer.json: older transformers (slow tokenizer) need them.
    for f in tmp.iterdir():
        f.replace(directory / f.name) if f.name in ("vocab.json", "merges.txt") else f.unlink()
    tmp.rmdir()
    return tok
