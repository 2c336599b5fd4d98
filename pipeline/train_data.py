"""How Ray Train workers read a split: streamed from the feature store (``setemb.streaming``), never copied whole.

Every worker opens the store itself (a local path or a URL every node reaches). Training batches come from
``streaming_tables`` (block-shuffled order, an LRU cache of blocks sized to what one step of all ranks can touch,
read-ahead in a thread); validation reads in order through ``sequential_tables``. ``feature_table`` is the in-memory
reference the tests compare against; nothing on the training path uses it.
"""

from __future__ import annotations

import logging
import math
from itertools import islice

import numpy as np

from pipeline.params import TrainDataParams
from setemb.feature_store import ModalityFeatures, SplitFeatures
from setemb.streaming import StreamingTable, prefetch
from setemb.training import CaptionIndex, FeatureTable, ImageCaptionBatches, make_batch

logger = logging.getLogger(__name__)


def feature_table(features: ModalityFeatures) -> FeatureTable:
    """A ``FeatureTable`` from an in-memory ``ModalityFeatures`` (``load_to_memory()``)."""
    if not features.in_memory:
        features = features.load_to_memory()
    # ModalityFeatures exposes no public accessor for the compacted local rows; read its in-memory array.
    local = features._arrays["local"]
    return FeatureTable(local, features.starts, features.lengths, features.global_features)


def streaming_tables(
    split: SplitFeatures, data: TrainDataParams, images_per_step: int, captions_per_image: int
) -> tuple[StreamingTable, StreamingTable, np.ndarray | None]:
    """Image and text tables of a split that read the store block by block (never the whole split), and the image
    block bounds the sampler orders by (None for ``shuffle: full``, a uniform permutation read item by item).

    The caches hold what one step of all ranks (``images_per_step`` = P x world size) can touch: two shuffle windows
    plus the windows one step spans, so every block is read about once per epoch and memory is bounded by the cache.
    """
    if data.shuffle == "full":
        block, cache = 1, 2 * images_per_step
    else:
        block = data.block_images
        cache = data.window_blocks * (2 + math.ceil(images_per_step / (block * data.window_blocks)))
    image = StreamingTable.from_features(split.image, block, cache)
    text = StreamingTable.from_features(split.text, block * captions_per_image, cache + 2)
    c2i = split.caption_to_image
    if len(c2i) > 1 and (np.diff(c2i) < 0).any():
        logger.warning("captions are not stored image-major: streaming reads of their blocks will repeat")
    return image, text, None if data.shuffle == "full" else image.bounds


def sequential_tables(split: SplitFeatures, block_items: int) -> tuple[StreamingTable, StreamingTable, np.ndarray]:
    """Tables for one in-order pass (validation): one block in memory at a time per modality."""
    image = StreamingTable.from_features(split.image, block_items, 2)
    text = StreamingTable.from_features(split.text, block_items, 2)
    return image, text, split.caption_to_image


def epoch_batches(
    image_table: StreamingTable,
    text_table: StreamingTable,
    caption_index: CaptionIndex,
    sampler: ImageCaptionBatches,
    steps: int,
    prefetch_batches: int,
):
    """The ``(image batch, text batch, caption_to_image)`` of one epoch on one rank, read ahead in a thread."""
    batches = (make_batch(image_table, text_table, caption_index, images) for images in islice(sampler, steps))
    return prefetch(batches, prefetch_batches)
