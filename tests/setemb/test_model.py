"""Tests for setemb.encoders and setemb.model: encoders, size augmentation, towers, create_model, param groups."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.encoders import create_encoder, drop_tokens, list_encoders, masked_max, masked_mean
from setemb.heads import create_head, list_heads
from setemb.model import SetEmbeddingModel, Tower, create_model, param_groups

D, D_IN, VOCAB, WORD = 16, 12, 30, 8
ENCODER_KWARGS = {
    "grid": {"input_dim": D_IN},
    "region": {"input_dim": D_IN},
    "token": {"input_dim": D_IN},
    "bigru": {"vocab_size": VOCAB, "word_dim": WORD, "hidden_dim": D},
}


def make_encoder(name: str, dtype: torch.dtype | None = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_encoder(name, embed_dim=D, dtype=dtype, **{**ENCODER_KWARGS[name], **kwargs})


def make_local(name: str, lengths: list[int], n: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    """Encoder input [B, n, D_IN] (or token ids [B, n]) with random padding, and the mask [B, n]."""
    gen = torch.Generator().manual_seed(seed)
    if name == "bigru":
        local = torch.randint(0, VOCAB, (len(lengths), n), generator=gen)
    else:
        local = torch.randn(len(lengths), n, D_IN, generator=gen, dtype=dtype)
    return local, torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def test_registry_names():
    assert list_encoders() == ["bigru", "grid", "region", "token"]


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_shapes_gradients(name):
    encoder = make_encoder(name).train()
    local, mask = make_local(name, [5, 3, 2], 5)
    out_local, out_global = encoder(local, None, mask)
    assert out_local.shape == (3, 5, encoder.local_dim)
    assert out_global.shape == (3, D)
    assert torch.isfinite(out_local).all() and torch.isfinite(out_global).all()
    gen = torch.Generator().manual_seed(2)
    loss = (out_local * mask[..., None] * torch.randn(out_local.shape, generator=gen)).sum()
    (loss + (out_global * torch.randn(out_global.shape, generator=gen)).sum()).backward()
    for n, p in encoder.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
        assert p.grad.abs().sum() > 0, f"Zero gradient for {n}"


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_padding_does_not_change_output(name):
    encoder = make_encoder(name, dtype=torch.float64).eval()
    lengths = [5, 3, 1]
    local, mask = make_local(name, lengths, 7, dtype=torch.float64)
    out_local, out_global = encoder(local, None, mask)
    for b, n in enumerate(lengths):
        alone_local, alone_global = encoder(local[b : b + 1, :n], None, None)
        torch.testing.assert_close(out_local[b, :n], alone_local[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out_global[b], alone_global[0], rtol=1e-10, atol=1e-12)


def test_region_batch_norm_statistics_ignore_padding():
    """Training mode: BatchNorm statistics come from valid regions only, so extra padding changes nothing."""
    encoder = make_encoder("region", dtype=torch.float64, dropout=0.0).train()
    local, mask = make_local("region", [4, 2, 3], 4, dtype=torch.float64)
    padded = torch.cat([local, torch.randn(3, 3, D_IN, dtype=torch.float64)], dim=1)  # [B, 7, D_in]
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=1)
    short_local, short_global = encoder(local, None, mask)
    long_local, long_global = encoder(padded, None, padded_mask)
    torch.testing.assert_close(long_local[:, :4][mask], short_local[mask], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(long_global, short_global, rtol=1e-10, atol=1e-12)


def test_grid_global_branches():
    encoder = make_encoder("grid")
    local, mask = make_local("grid", [4, 2], 4)
    out_local, out_global = encoder(local, None, mask)
    torch.testing.assert_close(out_global, masked_mean(out_local, mask))  # linear∘avgpool = avgpool∘linear
    with_global = make_encoder("grid", global_dim=6)
    assert with_global(local, torch.randn(2, 6), mask)[1].shape == (2, D)
    with pytest.raises(ValueError, match="global_ must be"):
        with_global(local, None, mask)
    raw = make_encoder("grid", project_local=False)
    assert raw.local_dim == D_IN and raw(local, None, mask)[0] is local


def test_bigru_non_contiguous_mask_equals_compacted_sequence():
    encoder = make_encoder("bigru", dtype=torch.float64).eval()
    ids = torch.tensor([[3, 7, 9, 4, 5]])
    gappy = torch.tensor([[True, False, True, False, True]])
    _, gappy_global = encoder(ids, None, gappy)
    _, compact_global = encoder(ids[:, [0, 2, 4]], None, None)
    torch.testing.assert_close(gappy_global, compact_global, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="token ids"):
        encoder(ids.double(), None, None)
    vectors = torch.randn(VOCAB, WORD)
    loaded = make_encoder("bigru", pretrained_vectors=vectors)
    torch.testing.assert_close(loaded.embedding.weight.detach(), vectors)


def test_masked_pools():
    x = torch.tensor([[[1.0], [5.0], [-2.0]], [[-3.0], [-4.0], [9.0]]])  # [B, N, 1]
    mask = torch.tensor([[True, False, True], [True, True, False]])
    torch.testing.assert_close(masked_max(x, mask), torch.tensor([[1.0], [-3.0]]))
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([[-0.5], [-3.5]]))
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert masked_max(x[:1], empty).eq(0).all() and masked_mean(x[:1], empty).eq(0).all()


# ------------------------------------------------------------------------------------------------ drop_tokens

masks_BN = st.tuples(st.integers(1, 6), st.integers(1, 8), st.floats(0.0, 0.95), st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(masks_BN)
def test_drop_tokens_keeps_a_valid_subset(case):
    B, N, p, seed = case
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=gen) < 0.7
    kept = drop_tokens(mask, p, generator=gen)
    assert kept.dtype == torch.bool and kept.shape == (B, N)
    assert not (kept & ~mask).any()  # a subset of the valid tokens
    assert torch.equal(kept.any(dim=1), mask.any(dim=1))  # >= 1 token wherever there was one


def test_drop_tokens_rate_and_reproducibility():
    mask = torch.ones(400, 50, dtype=torch.bool)
    kept = drop_tokens(mask, 0.2, generator=torch.Generator().manual_seed(0))
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.01  # 20000 tokens: std of the rate is 0.003
    again = drop_tokens(mask, 0.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    torch.testing.assert_close(drop_tokens(mask, 0.0), mask)
    with pytest.raises(ValueError, match="p must be"):
        drop_tokens(mask, 1.0)


def test_tower_drops_tokens_only_in_training():
    torch.manual_seed(0)
    encoder = create_encoder("token", input_dim=D_IN, embed_dim=D)
    head_kwargs = {"embed_dim": D, "num_embeddings": 2, "attention_dim": 16, "dropout": 0.0}
    tower = Tower(encoder, create_head("slot", **head_kwargs), token_drop=0.5)
    local, mask = make_local("token", [6, 6], 6)
    tower.eval()
    reference = tower(local, None, mask).embeddings
    torch.testing.assert_close(tower(local, None, mask).embeddings, reference)
    tower.train()
    dropped = [tower(local, None, mask).embeddings for _ in range(3)]
    assert any(not torch.allclose(d, reference) for d in dropped)
    tower.token_drop = 0.0
    torch.testing.assert_close(tower(local, None, mask).embeddings, reference)
    with pytest.raises(ValueError, match="token_drop"):
        Tower(encoder, tower.head, token_drop=1.0)


# ------------------------------------------------------------------------------------------------ create_model


def model_config(head: str, image_encoder: str = "region", **overrides) -> dict:
    k = 1 if head in ("probabilistic", "single_vector") else 3
    head_kwargs = {"attention_dim": 16, "num_heads": 2} if head in ("slot", "transformer") else {}
    config = {
        "embed_dim": D,
        "num_embeddings": k,
        "head": head,
        "head_kwargs": head_kwargs,
        "image_encoder": image_encoder,
        "image_encoder_kwargs": ENCODER_KWARGS[image_encoder],
        "text_encoder": "bigru",
        "text_encoder_kwargs": ENCODER_KWARGS["bigru"],
    }
    return {**config, **overrides}


def batches(image_encoder: str = "region"):
    image_local, image_mask = make_local(image_encoder, [4, 3], 4, seed=3)
    text_local, text_mask = make_local("bigru", [5, 2, 4, 3], 5, seed=4)
    return {"local": image_local, "global": None, "mask": image_mask}, {"local": text_local, "mask": text_mask}


@pytest.mark.parametrize("head", list_heads())
@pytest.mark.parametrize("image_encoder", ["grid", "region", "token"])
def test_create_model_forward_and_gradients(head, image_encoder):
    torch.manual_seed(0)
    model = create_model(**model_config(head, image_encoder, token_drop=0.2)).train()
    image_out, text_out = model(*batches(image_encoder))
    rows = 7 if head == "probabilistic" else model.config["num_embeddings"]
    assert image_out.embeddings.shape == (2, rows, D) and text_out.embeddings.shape == (4, rows, D)
    assert torch.isfinite(image_out.embeddings).all() and torch.isfinite(text_out.embeddings).all()
    gen = torch.Generator().manual_seed(5)
    loss = sum(
        (out.embeddings * torch.randn(out.embeddings.shape, generator=gen)).sum() for out in (image_out, text_out)
    )
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    assert model.image.head is not model.text.head
    assert model.text.head.input_dim == WORD and model.image.head.input_dim == D


def test_config_is_json_and_rebuilds_the_model():
    config = model_config(
        "slot",
        "grid",
        text_num_embeddings=2,
        image_head_kwargs={"positional_encoding": "sine2d"},
        text_head_kwargs={"positional_encoding": "sine1d"},
    )
    model = create_model(**config).eval()
    restored = create_model(**json.loads(json.dumps(model.config))).eval()
    restored.load_state_dict(model.state_dict())
    image_batch, text_batch = batches("grid")
    for before, after in zip(model(image_batch, text_batch), restored(image_batch, text_batch), strict=True):
        torch.testing.assert_close(before.embeddings, after.embeddings)
    assert model.image.head.positional_encoding == "sine2d" and model.text.head.positional_encoding == "sine1d"
    assert model.text.head.num_embeddings == 2 and model.image.head.num_embeddings == 3
    assert isinstance(model, SetEmbeddingModel)
    with pytest.raises(ValueError, match="needs key 'local'"):
        model({"mask": None}, text_batch)


def test_create_model_float64_and_token_drop_overrides():
    model = create_model(**model_config("pienet", token_drop=0.2, text_token_drop=0.0), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.image.token_drop == 0.2 and model.text.token_drop == 0.0
    image_batch, text_batch = batches()
    image_batch["local"] = image_batch["local"].double()
    assert model(image_batch, text_batch)[0].embeddings.dtype == torch.float64


def test_param_groups_cover_every_parameter_once():
    model = create_model(**model_config("slot"))
    model.text.encoder.embedding.weight.requires_grad_(False)  # frozen parameters are left out
    groups = param_groups(model, 1e-3, head_lr_scale=0.1, encoder_lr_scale=0.5, image_encoder_lr_scale=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    by_name = {g["name"]: g for g in groups}
    assert by_name["image.head"]["lr"] == pytest.approx(1e-4) and by_name["text.head"]["lr"] == pytest.approx(1e-4)
    assert by_name["image.encoder"]["lr"] == pytest.approx(1e-4) and by_name["text.encoder"]["lr"] == pytest.approx(
        5e-4
    )
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            n = names[id(p)]
            decayed = not ("bias" in n.rsplit(".", 1)[-1] or "norm" in n or ".bn." in n)
            assert (group["weight_decay"] > 0) == decayed, n
    assert any(names[id(p)] == "image.head.slots" for p in by_name["image.head"]["params"])
    torch.optim.AdamW(groups)  # accepted as-is
