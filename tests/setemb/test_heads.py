"""Tests for setemb.heads: shapes, gradients, masking, DivE eq. 2-5 properties, positional codes, PCME sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.heads import (
    SetOutput,
    create_head,
    list_heads,
    normalise_over_inputs,
    sine_encoding,
    sine_encoding_1d,
    sine_encoding_2d,
    slot_competition,
    softmax_over_inputs,
)

D, D_IN, K = 16, 12, 3
SINGLE = {"probabilistic", "single_vector"}  # heads with one embedding per sample


def make_head(name: str, dtype: torch.dtype | None = None, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny head; slot/transformer get D_h = 16 split over 2 heads."""
    torch.manual_seed(seed)
    extra = {"attention_dim": 16, "num_heads": 2} if name in ("slot", "transformer") else {}
    k = 1 if name in SINGLE else K
    return create_head(name, embed_dim=D, num_embeddings=k, input_dim=D_IN, dtype=dtype, **{**extra, **kwargs})


def make_inputs(lengths: list[int], n: int, dim: int = D_IN, dtype: torch.dtype = torch.float32, seed: int = 1):
    """local [B, n, dim] (padding filled with random values), global [B, D], mask [B, n]."""
    gen = torch.Generator().manual_seed(seed)
    local = torch.randn(len(lengths), n, dim, generator=gen, dtype=dtype)
    glob = torch.randn(len(lengths), D, generator=gen, dtype=dtype)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return local, glob, mask


def test_registry_names():
    assert list_heads() == ["pienet", "probabilistic", "single_vector", "slot", "transformer"]
    with pytest.raises(ValueError, match="known: pienet"):
        create_head("nope")


@pytest.mark.parametrize("name", list_heads())
def test_forward_shapes_unit_norm_no_nan(name):
    head = make_head(name).eval()
    local, glob, mask = make_inputs([5, 3, 1], 5)
    out = head(local, glob, mask)
    assert isinstance(out, SetOutput)
    B, N = mask.shape
    rows = {"probabilistic": 7, "single_vector": 1}.get(name, K)
    assert out.embeddings.shape == (B, rows, D)
    assert torch.isfinite(out.embeddings).all()
    if name == "probabilistic":
        assert out.mean.shape == out.logsigma.shape == (B, D)
        torch.testing.assert_close(out.mean.norm(dim=-1), torch.ones(B))
    else:
        torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(B, rows))
    if out.elements is not None:
        torch.testing.assert_close(out.elements.norm(dim=-1), torch.ones(B, out.elements.shape[1]))
    if out.attention is not None:  # one attention row per embedding row (what the embedding store requires)
        assert out.attention.shape == (B, out.embeddings.shape[1], N)
        assert torch.isfinite(out.attention).all()
    torch.testing.assert_close(out.global_embedding.norm(dim=-1), torch.ones(B))


@pytest.mark.parametrize("name", list_heads())
def test_every_parameter_gets_gradient(name):
    head = make_head(name, projection=True) if name == "single_vector" else make_head(name)
    head.train()
    local, glob, mask = make_inputs([5, 2], 5)
    out = head(local, glob, mask)
    weights = torch.randn(out.embeddings.shape, generator=torch.Generator().manual_seed(3))
    (out.embeddings * weights).sum().backward()
    named = dict(head.named_parameters())
    assert named, "every head here has parameters"
    for n, p in named.items():
        assert p.grad is not None, f"No gradient for {n}"
        assert p.grad.abs().sum() > 0, f"Zero gradient for {n}"
    if name in ("slot", "transformer"):
        assert "slots" in named and "block.norm_inputs.weight" in named and "norm_out.weight" in named


@pytest.mark.parametrize("name", list_heads())
def test_padding_does_not_change_output(name):
    """Each sample padded with random masked tokens inside a batch == the sample alone, unpadded (eval, float64)."""
    kwargs = {"sample_in_eval": False} if name == "probabilistic" else {}
    head = make_head(name, dtype=torch.float64, **kwargs).eval()
    lengths = [5, 3, 1]
    local, glob, mask = make_inputs(lengths, 8, dtype=torch.float64)
    batch = head(local, glob, mask)
    for b, n in enumerate(lengths):
        alone = head(local[b : b + 1, :n], glob[b : b + 1], None)
        torch.testing.assert_close(batch.embeddings[b], alone.embeddings[0], rtol=1e-10, atol=1e-12)
        if batch.attention is not None:
            torch.testing.assert_close(batch.attention[b, :, :n], alone.attention[0], rtol=1e-10, atol=1e-12)
            assert (batch.attention[b, :, n:] == 0).all()
        if name == "probabilistic":
            torch.testing.assert_close(batch.logsigma[b], alone.logsigma[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list_heads())
def test_float64_construction(name):
    head = make_head(name, dtype=torch.float64, **({"projection": True} if name == "single_vector" else {}))
    assert all(p.dtype == torch.float64 for p in head.parameters())
    local, glob, mask = make_inputs([4, 2], 4, dtype=torch.float64)
    assert head(local, glob, mask).embeddings.dtype == torch.float64


@pytest.mark.parametrize("name", list_heads())
def test_bad_shapes_raise(name):
    head = make_head(name)
    local, glob, mask = make_inputs([4, 2], 4)
    with pytest.raises(ValueError, match="local must be"):
        head(local[..., :-1], glob, mask)
    with pytest.raises(ValueError, match="global_ must be"):
        head(local, glob[:1], mask)
    with pytest.raises(ValueError, match="mask must be"):
        head(local, glob, mask.float())


# ------------------------------------------------------------------------------------------ DivE eq. 2-3 properties

logits_BHNK = st.tuples(
    st.integers(1, 3), st.integers(1, 2), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1)
)


@settings(max_examples=30, deadline=None)
@given(logits_BHNK)
def test_slot_softmax_and_input_normalisation(shape_seed):
    B, H, N, K_, seed = shape_seed
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, H, N, K_, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, N + 1, (B,), generator=gen)
    mask = torch.arange(N)[None, :] < lengths[:, None]  # [B, N]
    attention = slot_competition(logits, mask)  # eq. 2
    per_input = attention.sum(dim=-1)  # [B, H, N]
    torch.testing.assert_close(per_input, mask[:, None, :].expand(B, H, N).to(torch.float64))
    normalised = normalise_over_inputs(attention, eps=0.0)  # eq. 3
    torch.testing.assert_close(normalised.sum(dim=2), torch.ones(B, H, K_, dtype=torch.float64))
    column_mass = attention.sum(dim=2)  # [B, H, K]; with eps the columns sum to mass / (mass + eps)
    torch.testing.assert_close(normalise_over_inputs(attention).sum(dim=2), column_mass / (column_mass + 1e-7))
    assert (normalised * ~mask[:, None, :, None] == 0).all()
    leaky = slot_competition(logits, mask, official_mask_leak=True)
    padded = leaky.masked_select(~mask[:, None, :, None].expand_as(leaky))
    torch.testing.assert_close(padded, torch.full_like(padded, 1 / K_))  # official bug: 1/K for every slot
    inputs = softmax_over_inputs(logits, mask)
    torch.testing.assert_close(inputs.sum(dim=2), torch.ones(B, H, K_, dtype=torch.float64))
    assert (inputs * ~mask[:, None, :, None] == 0).all()


@pytest.mark.parametrize("name", ["slot", "transformer"])
def test_head_attention_columns_sum_to_one_over_valid_inputs(name):
    head = make_head(name, num_heads=4).eval()
    local, glob, mask = make_inputs([6, 2], 6)
    attention = head(local, glob, mask).attention  # [B, K, N]
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(2, K), atol=1e-5, rtol=0)
    assert (attention[1, :, 2:] == 0).all()


def test_slot_head_uses_slot_competition_not_input_softmax():
    """The slot head's attention is eq. 2 then eq. 3; the transformer head's is a softmax over inputs."""
    slot = make_head("slot").eval()
    local, glob, mask = make_inputs([5], 5)
    calls = []
    slot.block.register_forward_hook(lambda m, args, out: calls.append(args))  # returns None: output unchanged
    slot(local, glob, mask)
    slots, keys, values, _ = calls[0]
    q = slot.block.to_q(slot.block.norm_slots(slots)).reshape(1, K, 2, 8).transpose(1, 2)  # [B, H, K, d]
    logits = torch.einsum("bhnd,bhkd->bhnk", keys, q) / math.sqrt(8)
    expected = normalise_over_inputs(slot_competition(logits, mask)).mean(dim=1).transpose(1, 2)
    attention_first = slot.block(slots, keys, values, mask)[1].mean(dim=1).transpose(1, 2)
    torch.testing.assert_close(attention_first, expected)
    over_inputs = softmax_over_inputs(logits, mask).mean(dim=1).transpose(1, 2)
    assert not torch.allclose(attention_first, over_inputs)


def test_official_mask_leak_changes_output_only_with_padding():
    fixed = make_head("slot").eval()
    leaky = make_head("slot", official_mask_leak=True).eval()
    leaky.load_state_dict(fixed.state_dict())
    local, glob, mask = make_inputs([6, 3], 6)
    assert not torch.allclose(fixed(local, glob, mask).embeddings[1], leaky(local, glob, mask).embeddings[1])
    torch.testing.assert_close(fixed(local, glob, mask).embeddings[0], leaky(local, glob, mask).embeddings[0])
    full = torch.ones_like(mask)
    torch.testing.assert_close(fixed(local, glob, full).embeddings, leaky(local, glob, full).embeddings)


def test_weights_shared_across_iterations():
    counts = [sum(p.numel() for p in make_head("slot", num_iterations=t).parameters()) for t in (1, 4)]
    assert counts[0] == counts[1]
    one, four = make_head("slot", num_iterations=1).eval(), make_head("slot", num_iterations=4).eval()
    local, glob, mask = make_inputs([5, 2], 5)
    assert not torch.allclose(one(local, glob, mask).embeddings, four(local, glob, mask).embeddings)


def test_multi_head_scale_uses_head_width():
    head = make_head("slot", attention_dim=16, num_heads=4)
    assert head.block.scale == pytest.approx(1 / math.sqrt(4))
    with pytest.raises(ValueError, match="divisible"):
        make_head("slot", attention_dim=16, num_heads=3)


def test_slot_embeddings_follow_eq5():
    head = make_head("slot").eval()
    with torch.no_grad():  # non-trivial LayerNorm affines
        for norm in (head.norm_out, head.norm_global):
            norm.weight.normal_()
            norm.bias.normal_()
    captured = []
    head.block.register_forward_hook(lambda m, args, out: captured.append(out[0]))
    local, glob, mask = make_inputs([4, 2], 4)
    out = head(local, glob, mask)
    assert len(captured) == head.num_iterations
    final = captured[-1]  # E^T [B, K, D]
    expected = F.normalize(head.norm_out(final) + head.norm_global(glob)[:, None, :], dim=-1)
    torch.testing.assert_close(out.embeddings, expected)
    torch.testing.assert_close(out.elements, F.normalize(head.norm_out(final), dim=-1))
    torch.testing.assert_close(out.global_embedding, F.normalize(head.norm_global(glob), dim=-1))


def test_single_vector_equals_normalised_global():
    head = make_head("single_vector")
    local, glob, mask = make_inputs([3, 2], 3)
    out = head(local, glob, mask)
    torch.testing.assert_close(out.embeddings[:, 0], F.normalize(glob, dim=-1))
    with pytest.raises(ValueError, match="num_embeddings=1"):
        create_head("single_vector", embed_dim=D, num_embeddings=2)


# -------------------------------------------------------------------------------------------- positional encodings


def test_sine_encoding_formula():
    positions = torch.tensor([0.5, 2.0])
    code = sine_encoding(positions, 8)  # [2, 8]
    for i in range(8):
        angle = positions / 10000 ** (2 * (i // 2) / 8)
        torch.testing.assert_close(code[:, i], angle.sin() if i % 2 == 0 else angle.cos())
    grid = sine_encoding_2d(2, 3, 8)  # [6, 8]
    assert grid.shape == (6, 8)
    torch.testing.assert_close(grid[0, :4], grid[2, :4])  # row half depends on the row only
    torch.testing.assert_close(grid[0, 4:], grid[3, 4:])  # column half depends on the column only
    torch.testing.assert_close(grid[5, :4], sine_encoding(torch.tensor(2 * math.pi), 4))  # last row at 2π


def test_sine1d_valid_length_scaling():
    short = torch.tensor([[True, True, True]])
    padded = torch.tensor([[True, True, True, False, False]])
    torch.testing.assert_close(sine_encoding_1d(padded, 8)[:, :3], sine_encoding_1d(short, 8))
    assert not torch.allclose(sine_encoding_1d(padded, 8, official=True)[:, :3], sine_encoding_1d(short, 8))
    gappy = torch.tensor([[True, False, True, True]])  # a dropped token: ranks stay contiguous
    torch.testing.assert_close(sine_encoding_1d(gappy, 8)[:, [0, 2, 3]], sine_encoding_1d(short, 8))


def test_sine2d_changes_output_and_checks_grid():
    plain = make_head("slot").eval()
    grid = make_head("slot", positional_encoding="sine2d").eval()
    grid.load_state_dict(plain.state_dict())  # the code adds no parameters
    local, glob, _ = make_inputs([6, 6], 6)
    with pytest.raises(ValueError, match="rows \\* cols"):
        grid(local, glob)
    rect = make_head("slot", positional_encoding="sine2d", grid_size=[2, 3]).eval()
    rect.load_state_dict(plain.state_dict())
    assert not torch.allclose(rect(local, glob).embeddings, plain(local, glob).embeddings)
    square_local, square_glob, _ = make_inputs([4, 4], 4)
    assert not torch.allclose(grid(square_local, square_glob).embeddings, plain(square_local, square_glob).embeddings)


@pytest.mark.parametrize("official", [False, True])
def test_sine1d_caption_output_vs_batch_padding(official):
    head = make_head("slot", dtype=torch.float64, positional_encoding="sine1d", official_text_pe=official).eval()
    local, glob, mask = make_inputs([3, 7], 7, dtype=torch.float64)
    in_batch = head(local, glob, mask).embeddings[0]
    alone = head(local[:1, :3], glob[:1], mask[:1, :3]).embeddings[0]
    if official:
        assert not torch.allclose(in_batch, alone)
    else:
        torch.testing.assert_close(in_batch, alone, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------- PCME


def test_pcme_samples_mean_and_reproducibility():
    head = make_head("probabilistic", num_samples=4000).eval()
    local, glob, mask = make_inputs([4, 2], 4)
    out = head(local, glob, mask, generator=torch.Generator().manual_seed(5))
    assert out.embeddings.shape == (2, 4000, D)
    sigma = out.logsigma.exp()  # [B, D]
    error = (out.embeddings.mean(dim=1) - out.mean).abs()
    assert (error < 5 * sigma / math.sqrt(4000)).all()
    torch.testing.assert_close(out.embeddings.std(dim=1), sigma, rtol=0.1, atol=0.0)
    again = head(local, glob, mask, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.embeddings, out.embeddings, rtol=0, atol=0)
    other = head(local, glob, mask, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(other.embeddings, out.embeddings)


def test_pcme_eval_behaviour_is_explicit():
    sampling = make_head("probabilistic").eval()
    deterministic = make_head("probabilistic", sample_in_eval=False).eval()
    local, glob, mask = make_inputs([4, 2], 4)
    assert sampling(local, glob, mask).embeddings.shape == (2, 7, D)
    out = deterministic(local, glob, mask)
    torch.testing.assert_close(out.embeddings[:, 0], out.mean)
    assert deterministic.train()(local, glob, mask).embeddings.shape == (2, 7, D)  # training always samples
    with pytest.raises(ValueError, match="num_embeddings=1"):
        create_head("probabilistic", embed_dim=D, num_embeddings=4)


def test_pcme_eval_samples_are_seeded_per_head_and_independent_of_batching():
    head = make_head("probabilistic").eval()  # eval_seed 0 by default
    local, glob, mask = make_inputs([4, 2, 3], 4)
    whole = head(local, glob, mask).embeddings  # [3, J, D]
    torch.testing.assert_close(head(local, glob, mask).embeddings, whole, rtol=0, atol=0)  # reproducible
    torch.testing.assert_close(head(local[1:], glob[1:], mask[1:]).embeddings, whole[1:])  # no batch dependence
    other = make_head("probabilistic", eval_seed=1).eval()
    assert not torch.allclose(other(local, glob, mask).embeddings, whole)  # the text side uses another seed
    unseeded = make_head("probabilistic", eval_seed=-1).eval()
    assert not torch.allclose(unseeded(local, glob, mask).embeddings, unseeded(local, glob, mask).embeddings)


def test_pcme_sigma_reads_the_backbone_not_the_mean_features():
    """sigma_input="backbone": log σ depends only on the backbone rows, μ only on the encoder features (issue #10)."""
    head = make_head("probabilistic", backbone_dim=20).train()
    local, glob, mask = make_inputs([4, 2], 4)
    backbone = torch.randn(2, 4, 20, generator=torch.Generator().manual_seed(9)).requires_grad_()
    local.requires_grad_()
    glob.requires_grad_()
    out = head(local, glob, mask, backbone=backbone)
    out.logsigma.sum().backward(retain_graph=True)
    assert local.grad is None and glob.grad is None  # σ sends no gradient into the encoder's projections
    assert backbone.grad[:, :2].abs().sum() > 0 and (backbone.grad[1, 2:] == 0).all()  # padded rows ignored
    backbone.grad = None
    out.mean.sum().backward()
    assert backbone.grad is None and local.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="backbone must be"):
        head(local, glob, mask, backbone=backbone[..., :5])
    shared = make_head("probabilistic", sigma_input="shared").train()  # the collapsing design, kept as an ablation
    local.grad = None
    shared(local, glob, mask).logsigma.sum().backward()
    assert local.grad.abs().sum() > 0


def test_pcmepp_mean_std_output():
    head = make_head("probabilistic", output="mean_std")
    local, glob, mask = make_inputs([4, 2], 4)
    for mode in (head.train(), head.eval()):
        out = mode(local, glob, mask)
        assert out.embeddings.shape == (2, 2, D) and out.attention.shape == (2, 2, 4)
        torch.testing.assert_close(out.embeddings[:, 0], out.mean)
        torch.testing.assert_close(out.embeddings[:, 1], out.logsigma.exp())
    with pytest.raises(ValueError, match="output must be"):
        make_head("probabilistic", output="samples_and_mean")
