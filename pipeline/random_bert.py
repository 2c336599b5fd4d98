"""An offline, random-weight BERT folder: the `bert` text backbone's shape without downloading bert-base-uncased.

Benchmarks and GPU tests need BERT's compute (12 layers, width 768 by default) but no pretrained weights, and nothing
may download at run time. `write_random_bert` writes an ordinary HF folder (config.json, model.safetensors, a WordPiece
vocab.txt of the given captions' words) that ``create_text_backbone("bert", weights=folder)`` loads like the real one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

_WORD = re.compile(r"\w+|[^\w\s]")
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_random_bert(
    folder: str | Path,
    captions: Iterable[str],
    *,
    hidden_size: int = 768,
    num_hidden_layers: int = 12,
    num_attention_heads: int = 12,
    intermediate_size: int = 3072,
    seed: int = 0,
) -> Path:
    """Write a seeded random ``BertModel`` of the given shape and a tokenizer covering ``captions`` to ``folder``.

    Args:
        folder: output folder (created).
        captions: text whose lower-cased words (and punctuation) form the vocabulary, after BERT's five specials.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ``BertConfig`` shape (bert-base by
            default).
        seed: ``torch.manual_seed`` for the weights.

    Returns:
        ``folder``.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for c in captions for w in _WORD.findall(c.lower())} - set(_SPECIALS))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*_SPECIALS, *words]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True, do_lower_case=True)  # reads vocab.txt
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(_SPECIALS) + len(words),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(str(folder))
    return folder
