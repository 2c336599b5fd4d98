"""Run the frozen backbones over every split and write the Zarr feature store (one per dataset x backbone pair).

The store records a fingerprint of the extract params and the input data. A rerun with the same fingerprint resumes
(finished work units are kept; a complete store is a no-op); with a different one the stale store, which DVC keeps
(``persist: true``), is wiped and rebuilt. Files kept inside the store directory: ``vocab.json`` (glove vocabulary,
built from the train captions), ``glove_vectors.npy`` (when ``extract.glove.vectors`` is set) and ``rejected.json``
(``on_bad_image: skip``: every image left out, with its id, path and reason).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.cli import StageError
from pipeline.files import GLOVE_VECTORS, REJECTED_JSON, VOCAB_JSON, file_sha256, write_json_atomic
from pipeline.params import ExtractParams, ParamsError, format_validation_error

logger = logging.getLogger("setemb.stage.extract")

EXTRACT_VERSION = 1  # bump when a code change alters the stored values (invalidates persisted stores)
# the stored values do not depend on these; device and precision enter through the resolved `Compute` instead
_NOT_IN_FINGERPRINT = ("workers", "gpus_per_worker", "device", "precision")
LEGACY_IMAGE_TRANSFORM = "center_crop"  # what stores extracted before extract.image_transform existed used


@dataclass
class ExtractSummary:
    """What `run_extract` did."""

    out: Path
    fingerprint: str
    status: str  # "complete" (nothing to do), "resumed" or "created"
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: int = 0


def resolve_extract_params(base: ExtractParams, **overrides: Any) -> ExtractParams:
    """``base`` with the CLI overrides that are not None, validated again (ParamsError -> exit 2).

    Choosing ``image_backbone="precomputed"`` implies ``source="precomp"`` and vice versa, unless both are given.
    """
    updates = {k: v for k, v in overrides.items() if v is not None}
    if updates.get("image_backbone") == "precomputed" and "source" not in updates:
        updates["source"] = "precomp"
    if updates.get("source") == "precomp" and "image_backbone" not in updates:
        updates["image_backbone"] = "precomputed"
    try:
        return ExtractParams.model_validate({**base.model_dump(), **updates})
    except ValidationError as err:
        lines = format_validation_error(err).replace("\n", "; ")
        raise ParamsError(f"invalid extract option (command line or params.yaml): {lines}") from None


def data_signature(extract: ExtractParams, dataset_json: Path, image_root: Path, precomp_root: Path | None) -> dict:
    """What identifies the input data: the dataset JSON's content hash and the image root, or the size and mtime
    of every precomp file of the requested splits (those arrays are too large to hash)."""
    if extract.source == "karpathy":
        if not dataset_json.is_file():
            raise FileNotFoundError(
                f"dataset json not found: {dataset_json}; run `dvc repro prepare` or fix --dataset-json"
            )
        return {"dataset_json": file_sha256(dataset_json), "image_root": str(image_root)}
    if precomp_root is None:
        raise ParamsError("extract.source=precomp needs --precomp-root (or paths.precomp_root)")
    if not precomp_root.exists():
        raise FileNotFoundError(f"precomp features not found: {precomp_root}")
    files = [precomp_root] if precomp_root.is_file() else sorted(p for p in precomp_root.iterdir() if p.is_file())
    sig = {str(p.name): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    if precomp_root.is_file():  # HDF5 regions + the Karpathy JSON that defines the splits
        sig["dataset_json"] = file_sha256(dataset_json)
    return sig


def fingerprint(extract: ExtractParams, limit: int | None, signature: dict, compute: Any = None) -> str:
    """sha256 over the params that shape the stored values, ``--limit``, the data signature and the code version,
    plus the resolved device / autocast (`pipeline.devices.Compute`) when it is not CPU float32.

    ``image_transform`` enters only when it is not ``center_crop``, the transform of every store extracted before
    the param existed (those stores keep their fingerprint), and never for precomputed regions (no pixels).
    """
    params = {k: v for k, v in extract.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
    if params["image_transform"] == LEGACY_IMAGE_TRANSFORM or extract.image_backbone == "precomputed":
        del params["image_transform"]
    content = {"v": EXTRACT_VERSION, "extract": params, "limit": limit, "data": signature}
    if compute is not None and not compute.is_default:
        content["compute"] = compute.label
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _store_attrs(out: Path) -> dict[str, Any] | None:
    """Root attrs of an existing feature store at ``out``, or None when ``out`` is not one."""
    import zarr

    from setemb.feature_store import FEATURE_FORMAT

    if not (out / "zarr.json").is_file():
        return None
    try:
        attrs = zarr.open_group(str(out), mode="r", use_consolidated=False).attrs.asdict()
    except Exception:  # noqa: BLE001 - unreadable metadata: treated as "not a store"
        return None
    return attrs if attrs.get("format") == FEATURE_FORMAT else None


def _prepare_store(out: Path, fp: str) -> str:
    """``complete`` (same fingerprint, finished), ``resumed`` (same fingerprint, unfinished) or ``created``."""
    if out.exists():
        attrs = _store_attrs(out)
        if attrs is None:
            if out.is_dir() and not any(out.iterdir()):
                return "created"
            raise StageError(f"{out} exists and is not a setemb feature store; remove it or pass another --out")
        if attrs.get("fingerprint") == fp:
            return "complete" if attrs.get("complete") is True else "resumed"
        logger.warning(
            "%s was extracted with other params or data (fingerprint %s, now %s): wiping it and extracting again",
            out,
            attrs.get("fingerprint"),
            fp,
        )
        shutil.rmtree(out)
    return "created"


class _Inputs:
    """Reads each split's `SplitIndex` (and region array) from the configured source."""

    def __init__(self, extract: ExtractParams, dataset_json: Path, image_root: Path, precomp_root: Path | None):
        self.extract, self.dataset_json, self.image_root, self.precomp_root = (
            extract,
            dataset_json,
            image_root,
            precomp_root,
        )
        self._hdf5: tuple[list[str], Any] | None = None

    def split(self, name: str) -> tuple[Any, Any]:
        from setemb.data import align_region_rows, read_karpathy, read_precomp

        cpi = self.extract.captions_per_image
        if self.extract.source == "karpathy":
            return read_karpathy(self.dataset_json, self.image_root, name, cpi), None
        if self.precomp_root.is_dir():
            return read_precomp(self.precomp_root, name, cpi)
        if self._hdf5 is None:
            from pipeline.regions import read_region_hdf5

            self._hdf5 = read_region_hdf5(self.precomp_root)
        row_ids, regions = self._hdf5
        index = align_region_rows(read_karpathy(self.dataset_json, self.image_root, name, cpi), row_ids)
        return index, regions

    def captions(self, name: str) -> tuple[list[str], int]:
        """The split's captions (image-major) and captions per image, without touching images or regions."""
        from setemb.data import read_karpathy, read_precomp

        cpi = self.extract.captions_per_image
        if self.extract.source == "precomp" and self.precomp_root.is_dir():
            index = read_precomp(self.precomp_root, name, cpi)[0]
        else:
            index = read_karpathy(self.dataset_json, self.image_root, name, cpi)
        return index.captions, cpi


def _text_kwargs(extract: ExtractParams, inputs: _Inputs, out: Path, limit: int | None) -> dict[str, Any]:
    """glove: the vocabulary of the TRAIN captions (after ``--limit``), saved once as ``<out>/vocab.json``."""
    if extract.text_backbone != "glove":
        return {}
    from pipeline.text_backbones import Vocabulary, load_glove_vectors

    vocab_path = out / VOCAB_JSON
    if vocab_path.is_file():
        vocab = Vocabulary.load(vocab_path)
    else:
        captions, cpi = inputs.captions("train")
        captions = captions if limit is None else captions[: limit * cpi]
        vocab = Vocabulary.build(captions, min_count=extract.glove.min_count)
        vocab.save(vocab_path)
        logger.info("glove vocabulary: %d words from %d train captions -> %s", len(vocab), len(captions), vocab_path)
    if extract.glove.vectors is not None and not (out / GLOVE_VECTORS).is_file():
        import numpy as np

        matrix, found = load_glove_vectors(extract.glove.vectors, vocab)
        np.save(out / GLOVE_VECTORS, matrix)
        logger.info("glove vectors: %d of %d words found in %s", found, len(vocab), extract.glove.vectors)
    return {"vocab": str(vocab_path)}


def store_fingerprint(
    extract: ExtractParams, dataset_json: Path, image_root: Path, precomp_root: Path | None, limit: int | None = None
) -> tuple[str, Any]:
    """The fingerprint a store extracted with ``extract`` from this data would carry, and the resolved `Compute`.

    Raises:
        FileNotFoundError, ParamsError: the input data cannot be signed (``data_signature``).
    """
    from pipeline.devices import resolve_compute

    compute = resolve_compute(extract.device, extract.precision)
    signature = data_signature(extract, dataset_json, image_root, precomp_root)
    return fingerprint(extract, limit, signature, compute), compute


def store_image_transform(attrs: dict[str, Any]) -> str | None:
    """The ``image_transform`` a store's root ``attrs`` record (stores from before the param: ``center_crop``;
    precomputed regions: None, no pixels)."""
    if attrs.get("image_backbone") == "precomputed":
        return None
    return (attrs.get("extract") or {}).get("image_transform", LEGACY_IMAGE_TRANSFORM)


def extraction_mismatch(extract: ExtractParams, attrs: dict[str, Any]) -> list[str]:
    """The readable part of a fingerprint mismatch: what differs between ``extract`` and the store that ``attrs``
    describe over the backbones and the test-time transform (``["image_transform: store resize, params
    center_crop", ...]``); empty when those agree (the difference is then elsewhere: other params or data)."""
    wanted = {
        "image_backbone": extract.image_backbone,
        "text_backbone": extract.text_backbone,
        "image_transform": None if extract.image_backbone == "precomputed" else extract.image_transform,
    }
    found = {
        "image_backbone": attrs.get("image_backbone"),
        "text_backbone": attrs.get("text_backbone"),
        "image_transform": store_image_transform(attrs),
    }
    return [f"{key}: store {found[key]}, params {wanted[key]}" for key in wanted if found[key] != wanted[key]]


def _visual_kwargs(extract: ExtractParams) -> dict[str, Any] | None:
    """Builder options of the image backbone: the test-time transform of the CNNs (regions have no pixels)."""
    return None if extract.image_backbone == "precomputed" else {"image_transform": extract.image_transform}


def run_extract(
    extract: ExtractParams,
    out: Path,
    *,
    dataset_json: Path,
    image_root: Path,
    precomp_root: Path | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> ExtractSummary:
    """Extract ``extract.splits`` into the store at ``out`` (created, resumed, or left alone when complete).

    Raises:
        ParamsError: inconsistent source options (exit 2).
        FileNotFoundError, ValueError, StageError: missing inputs or weights, bad images or captions (exit 1).
    """
    from pipeline.extract_workers import WorkerPool
    from pipeline.extraction import run_extraction
    from setemb.feature_store import FeatureStoreWriter

    fp, compute = store_fingerprint(extract, dataset_json, image_root, precomp_root, limit)
    logger.info("extraction computes on %s", compute.label)
    status = _prepare_store(out, fp)
    summary = ExtractSummary(out, fp, status)
    if status == "complete":
        logger.info("%s is complete for these params and data (fingerprint %s): nothing to do", out, fp)
        if (out / REJECTED_JSON).is_file():
            summary.rejected = int(json.loads((out / REJECTED_JSON).read_text(encoding="utf-8")).get("count", 0))
        return summary
    root_attrs = {
        "fingerprint": fp,
        "image_backbone": extract.image_backbone,
        "text_backbone": extract.text_backbone,
        "source": extract.source,
        "extract": extract.model_dump(mode="json"),
        "limit": limit,
    }
    writer = FeatureStoreWriter(out, overwrite=status == "created", attrs=root_attrs)
    logger.info("%s store %s (fingerprint %s)", "resuming" if status == "resumed" else "creating", out, fp)
    inputs = _Inputs(extract, dataset_json, image_root, precomp_root)
    text_kwargs = _text_kwargs(extract, inputs, out, limit)
    rejected_path = out / REJECTED_JSON
    rejected = {"fingerprint": fp, "splits": {}}
    if extract.on_bad_image == "skip" and rejected_path.is_file():
        previous = json.loads(rejected_path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == fp:
            rejected = previous

    def record(split: str, items: list[dict[str, str]]) -> None:
        if extract.on_bad_image == "skip":
            rejected["splits"][split] = items
            rejected["count"] = sum(len(v) for v in rejected["splits"].values())
            write_json_atomic(rejected_path, rejected, ensure_ascii=False)

    with WorkerPool(extract.workers, compute, extract.gpus_per_worker) as pool:
        for split in extract.splits:
            index, regions = inputs.split(split)
            writer.root.attrs["dataset"] = index.dataset
            report = run_extraction(
                index,
                writer,
                extract.image_backbone,
                extract.text_backbone,
                image_weights=extract.image_weights,
                text_weights=extract.text_weights,
                visual_kwargs=_visual_kwargs(extract),
                text_kwargs=text_kwargs,
                regions=regions,
                dtype=extract.dtype,
                batch_size=extract.batch_size,
                items_per_unit=extract.items_per_unit,
                pool=pool,
                limit=limit,
                on_bad_image=extract.on_bad_image,
                rejected=rejected["splits"].get(split),
                progress=progress,
                on_filtered=lambda items, split=split: record(split, items),
            )
            summary.splits[split] = {"images": report.images, "captions": report.captions, **report.timings}
            summary.rejected += len(report.rejected)
    with warnings.catch_warnings():  # our side files (rejected.json, vocab.json) are not zarr nodes
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        writer.finalize()
    done = {m: [sum(v[m][k] for v in summary.splits.values()) for k in ("items", "seconds")] for m in ("image", "text")}
    logger.info(
        "%s complete, (images, captions) per split %s; this run: %d images at %.1f/s, %d captions at %.1f/s",
        out,
        {s: (v["images"], v["captions"]) for s, v in summary.splits.items()},
        done["image"][0],
        done["image"][0] / max(done["image"][1], 1e-9),
        done["text"][0],
        done["text"][0] / max(done["text"][1], 1e-9),
    )
    return summary
