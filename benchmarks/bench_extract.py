"""Extract-stage throughput: the real code path (decode + forward + Zarr write) against the backbone forward alone.

Both run in this process with one torch thread (what every extraction worker uses), on the same `shapes` demo
images, in the same run. Prints images/s end-to-end vs forward-only and their ratio (target >= 0.9), the same for
MiniLM captions, and the end-to-end rate without decode overlap (``decode_threads=0``) for comparison.

    .venv/bin/python benchmarks/bench_extract.py [--images 256] [--backbone efficientnet_lite0] [--workers 2]

``--workers 2`` adds an end-to-end run over 2 Ray actors (includes Ray and actor start-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from pipeline.extraction import run_extraction, subset_index  # noqa: E402
from pipeline.image_backbones import create_visual_backbone, decode_image  # noqa: E402
from pipeline.shapes import SHAPES_PROFILES, generate_shapes  # noqa: E402
from pipeline.text_backbones import create_text_backbone  # noqa: E402
from setemb.data import read_karpathy  # noqa: E402
from setemb.feature_store import FeatureStoreWriter  # noqa: E402


def forward_only(model, images: torch.Tensor, batch_size: int) -> float:
    """Images/s of ``model`` over pre-decoded, pre-processed ``images [n, 3, H, W]``."""
    start = time.perf_counter()
    for b in range(0, len(images), batch_size):
        model(images[b : b + batch_size])
    return len(images) / (time.perf_counter() - start)


def encode_only(model, captions: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    for b in range(0, len(captions), batch_size):
        model.encode(captions[b : b + batch_size])
    return len(captions) / (time.perf_counter() - start)


def end_to_end(index, backbone: str, out: Path, **kwargs) -> dict[str, float]:
    writer = FeatureStoreWriter(out, overwrite=True)
    report = run_extraction(index, writer, backbone, "minilm", **kwargs)
    return {m: t["items_per_s"] for m, t in report.timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="shapes dataset (generated if absent)")
    parser.add_argument("--images", type=int, default=192, help="train images to extract")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--items-per-unit", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (best of)")
    parser.add_argument("--workers", type=int, default=1, help="> 1 adds a Ray run with this many actors")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if not (args.data / "dataset.json").is_file():
        generate_shapes(args.data, **SHAPES_PROFILES["demo"])
    full = read_karpathy(args.data / "dataset.json", args.data / "images", "train")
    index = subset_index(full, range(min(args.images, full.n_images)))
    torch.set_num_threads(1)

    vis = create_visual_backbone(args.backbone)
    txt = create_text_backbone("minilm")
    t0 = time.perf_counter()
    images = torch.stack([vis.preprocess(decode_image(p)) for p in index.image_paths])  # [n, 3, H, W]
    decode_rate = len(images) / (time.perf_counter() - t0)
    forward_only(vis, images[: args.batch_size], args.batch_size)  # warm-up
    kw = {"batch_size": args.batch_size, "items_per_unit": args.items_per_unit}
    fwd, txt_fwd, e2e, inline = 0.0, 0.0, {"image": 0.0, "text": 0.0}, {"image": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # interleaved rounds, best of each: a shared box drifts between passes
            fwd = max(fwd, forward_only(vis, images, args.batch_size))
            txt_fwd = max(txt_fwd, encode_only(txt, index.captions, 128))
            got = end_to_end(index, args.backbone, Path(tmp) / f"a{r}.zarr", workers=1, decode_threads=1, **kw)
            e2e = {m: max(e2e[m], got[m]) for m in e2e}
            got = end_to_end(index, args.backbone, Path(tmp) / f"b{r}.zarr", workers=1, decode_threads=0, **kw)
            inline["image"] = max(inline["image"], got["image"])
        ray = (
            end_to_end(index, args.backbone, Path(tmp) / "c.zarr", workers=args.workers, **kw)
            if args.workers > 1
            else None
        )

    print(f"{args.backbone}, {len(images)} images ({images.shape[-1]} px input), batch {args.batch_size}, 1 thread")
    print(f"  decode + preprocess only        {decode_rate:8.1f} img/s")
    print(f"  forward only                    {fwd:8.1f} img/s")
    print(f"  end-to-end (decode overlapped)  {e2e['image']:8.1f} img/s   ratio {e2e['image'] / fwd:.2f}")
    print(f"  end-to-end (decode inline)      {inline['image']:8.1f} img/s   ratio {inline['image'] / fwd:.2f}")
    print(f"minilm, {len(index.captions)} captions, batch 128, 1 thread (best of {args.rounds} interleaved rounds)")
    print(f"  encode only                     {txt_fwd:8.1f} cap/s")
    print(f"  end-to-end                      {e2e['text']:8.1f} cap/s   ratio {e2e['text'] / txt_fwd:.2f}")
    if ray is not None:
        print(f"{args.workers} Ray actors (incl. start-up): {ray['image']:.1f} img/s, {ray['text']:.1f} cap/s")


if __name__ == "__main__":
    main()
