"""How Ray Train workers read a split: streamed from the feature store (``setemb.streaming``), never copied whole.

Every worker opens the store itself (a local path or a URL every node reaches). Training batches come from
``streaming_tables`` (block-shuffled order, a cache of blocks in the store's float16 that drops each block after the
rank's last batch that needs it, read-ahead in a thread, batches kept in float16 until the step converts them);
validation reads in order through ``sequential_tables``. ``feature_table`` is the in-memory
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
    split: SplitFeatures, data: TrainDataParams, images_per_batch: int, captions_per_image: int
) -> tuple[StreamingTable, StreamingTable, np.ndarray | None]:
    """Image and text tables of a split that read the store block by block (never the whole split), and the image
    block bounds the sampler orders by (None for ``shuffle: full``, a uniform permutation read item by item).

    The caches' LRU bound is what one batch of this rank can touch: the blocks of the (at most
    ``1 + ceil(P / window)``) windows it spans, so every block is read once per epoch by each rank that meets it.
    ``epoch_batches`` announces the epoch's batches, so a block leaves as soon as this rank is done with it and the
    cache holds about one window (``window_blocks + 1`` blocks at most). The tables keep the store's float16 in
    their blocks and batches. (The reads run in one thread, the prefetcher, so read-ahead needs no more room.)
    """
    if data.shuffle == "full":
        block, cache = 1, images_per_batch
    else:
        block = data.block_images
        cache = data.window_blocks * (1 + math.ceil(images_per_batch / (block * data.window_blocks)))
    image = StreamingTable.from_features(split.image, block, cache, store_dtype=True)
    text = StreamingTable.from_features(split.text, block * captions_per_image, 1, store_dtype=True)
    # caption blocks follow the text store's own units, so a window's captions may span more blocks than its images
    text.cache_blocks = math.ceil(cache * (len(text.bounds) - 1) / (len(image.bounds) - 1)) + 2
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
    """The ``(image batch, text batch, caption_to_image)`` of one epoch on one rank, read ahead in a thread.

    The rank's batches are announced to both tables first (``StreamingTable.expect``), so each block is dropped
    after its last use in this epoch.
    """
    plan = list(islice(sampler, steps))  # [steps] arrays of <= P image rows (small: indices only)
    image_table.expect(plan)
    text_table.expect(caption_index.captions_of(images)[0] for images in plan)
    batches = (make_batch(image_table, text_table, caption_index, images) for images in plan)
    return prefetch(batches, prefetch_batches)
