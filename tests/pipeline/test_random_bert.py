"""pipeline/random_bert.py: the random BERT folder loads through the real `bert` backbone and tokenises its words."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.random_bert import write_random_bert
from pipeline.text_backbones import create_text_backbone

CAPTIONS = ["A small red circle above a blue square.", "Two green triangles!"]


def test_random_bert_folder_is_a_bert_backbone(tmp_path: Path) -> None:
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    folder = write_random_bert(tmp_path / "bert", CAPTIONS, **tiny)
    model = create_text_backbone("bert", weights=folder)
    assert "[UNK]" not in model.tokenizer.tokenize(CAPTIONS[0])
    local, global_, lengths = model.encode(CAPTIONS)  # [2, T, 32], [2, 32], [2]
    assert local.shape == (2, 11, 32) and lengths.tolist() == [11, 6] and torch.isfinite(global_).all()
    again = create_text_backbone("bert", weights=write_random_bert(tmp_path / "b2", CAPTIONS, **tiny))
    assert torch.equal(again.encode(CAPTIONS)[1], global_)  # seeded
