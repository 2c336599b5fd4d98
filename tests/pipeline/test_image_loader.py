"""pipeline/image_loader.py: batches in order and equal to inline decoding, errors reach the consumer, early exit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.image_loader import BatchLoader


def fake_load(i: int) -> torch.Tensor:
    time.sleep(0.001 * (i % 3))  # uneven decode times: results must still come back in order
    return torch.full((3, 2, 2), float(i))


RANGES = [(0, 4), (4, 8), (8, 9), (9, 14)]  # uneven batches, last one short


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_batches_come_in_order_with_the_inline_values(threads: int) -> None:
    with BatchLoader(fake_load, RANGES, threads=threads) as loader:
        batches = list(loader)
    assert [b.shape[0] for b in batches] == [4, 4, 1, 5]
    assert torch.equal(torch.cat(batches)[:, 0, 0, 0], torch.arange(14, dtype=torch.float32))


def test_a_failed_load_is_raised_to_the_consumer_after_the_earlier_batches() -> None:
    def load(i: int) -> torch.Tensor:
        if i == 6:
            raise ValueError("cannot decode image 6.jpg")
        return fake_load(i)

    seen = []
    with pytest.raises(ValueError, match="6.jpg"), BatchLoader(load, RANGES, threads=2) as loader:
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 1  # batch (0, 4) arrived; batch (4, 8) holds the bad item


def test_leaving_early_stops_the_threads() -> None:
    before = threading.active_count()
    ranges = [(i, i + 1) for i in range(200)]
    with BatchLoader(fake_load, ranges, threads=2, depth=1) as loader:
        next(iter(loader))
    time.sleep(0.2)
    assert threading.active_count() <= before
