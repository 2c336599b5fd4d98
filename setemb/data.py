"""Dataset readers: Karpathy split JSON (COCO, Flickr30K, shapes) and SCAN "precomp" region features -> `SplitIndex`.

Formats are described in shared/reference/DATA_FORMATS.md (cited as DATA §x); the retrieval protocol (first 5 captions
per image, image-major caption order, 1K folds) is M§6. Only json and numpy are used here: images are never opened,
image files are not checked (``missing_images`` lists them; the extract stage reports them per item).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

# Karpathy split names -> the `split` values of the JSON they gather (DATA §1: COCO `restval` is trained on).
_KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("train", "restval"),
    "val": ("val",),
    "test": ("test",),
    "restval": ("restval",),
}
_SPLIT_ALIASES = {"dev": "val"}  # precomp naming (DATA §4)


@dataclass(frozen=True, eq=False)
class SplitIndex:
    """One split of a retrieval dataset, image-major (M§6): captions of image ``i`` are ``[cpi*i, cpi*i + cpi)``.

    Attributes:
        name: split name as requested ("train", "val", "test", ...).
        image_ids: [n_images] stable string ids (COCO ``cocoid``, else Karpathy ``imgid``, else the filename stem;
            precomp: the line of ``{split}_ids.txt``, else the image's row number).
        image_paths: [n_images] absolute image paths, or None for precomputed features.
        captions: [C] raw captions, C = n_images * captions_per_image.
        caption_ids: [C] caption ids (Karpathy ``sentid``; precomp: line number in ``{split}_caps.txt``).
        caption_to_image: [C] int64, ``caption_to_image[c] = c // captions_per_image``.
        captions_per_image: captions kept per image (5 for the retrieval protocol).
        region_rows: [n_images] int64 row of each image in a region-feature array, or None.
        dataset: the dataset name from the file ("coco", "flickr30k", "shapes", "precomp", ...).
    """

    name: str
    image_ids: list[str]
    image_paths: list[Path] | None
    captions: list[str]
    caption_ids: list[str]
    caption_to_image: np.ndarray
    captions_per_image: int
    region_rows: np.ndarray | None = None
    dataset: str = ""

    def __post_init__(self) -> None:
        n, cpi, C = len(self.image_ids), self.captions_per_image, len(self.captions)
        if cpi < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {cpi}")
        if len(set(self.image_ids)) != n:
            raise ValueError(f"split {self.name!r}: image_ids are not unique")
        if C != n * cpi or len(self.caption_ids) != C:
            raise ValueError(
                f"split {self.name!r}: expected {n} images x {cpi} = {n * cpi} captions and caption ids, "
                f"got {C} captions and {len(self.caption_ids)} ids"
            )
        expected = np.repeat(np.arange(n, dtype=np.int64), cpi)  # [C]
        c2i = np.asarray(self.caption_to_image)
        if c2i.shape != (C,) or c2i.dtype != np.int64 or not np.array_equal(c2i, expected):
            raise ValueError(
                f"split {self.name!r}: caption_to_image must be the int64 image-major map repeat(arange({n}), {cpi}), "
                f"got dtype {c2i.dtype} shape {c2i.shape}"
            )
        if self.image_paths is not None and len(self.image_paths) != n:
            raise ValueError(f"split {self.name!r}: expected {n} image paths, got {len(self.image_paths)}")
        if self.region_rows is not None:
            rows = np.asarray(self.region_rows)
            if rows.shape != (n,) or rows.dtype != np.int64:
                raise ValueError(f"split {self.name!r}: region_rows must be int64 [{n}], got {rows.dtype} {rows.shape}")
            rows.setflags(write=False)
        c2i.setflags(write=False)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def _image_major(n_images: int, captions_per_image: int) -> np.ndarray:
    return np.repeat(np.arange(n_images, dtype=np.int64), captions_per_image)  # [C]


def _load_json(json_path: Path) -> dict[str, Any]:
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {json_path} (expected e.g. dataset_coco.json)")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f'{json_path}: expected an object with an "images" list (Karpathy split format)')
    return data


def read_karpathy(
    json_path: str | Path,
    image_root: str | Path,
    split: str,
    captions_per_image: int = 5,
    *,
    short_images: Literal["error", "drop"] = "error",
) -> SplitIndex:
    """Read one split of a Karpathy split JSON (COCO, Flickr30K, shapes; DATA §1).

    Images keep the JSON order; each keeps its FIRST ``captions_per_image`` sentences (M§6: some COCO images have 6-7).
    COCO entries live under ``image_root / filepath / filename``, Flickr30K and shapes under ``image_root / filename``.

    Args:
        json_path: the ``dataset_*.json`` file.
        image_root: folder holding the images (COCO: the folder holding ``train2014/`` and ``val2014/``).
        split: "train" (includes COCO ``restval``), "val" (alias "dev"), "test" or "restval".
        captions_per_image: captions kept per image.
        short_images: what to do with an image that has fewer captions: "error" raises, "drop" skips it (logged).

    Returns:
        The split's `SplitIndex` with absolute ``image_paths``.

    Raises:
        FileNotFoundError: ``json_path`` does not exist.
        ValueError: malformed JSON, unknown split, an empty caption, too few captions, or no image in the split.
    """
    json_path = Path(json_path)
    wanted = _KARPATHY_SPLITS.get(_SPLIT_ALIASES.get(split, split))
    if wanted is None:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_KARPATHY_SPLITS)} (or 'dev')")
    if short_images not in ("error", "drop"):
        raise ValueError(f"short_images must be 'error' or 'drop', got {short_images!r}")
    data = _load_json(json_path)
    root = Path(image_root).absolute()
    image_ids: list[str] = []
    paths: list[Path] = []
    captions: list[str] = []
    caption_ids: list[str] = []
    dropped: list[str] = []
    seen_splits: set[str] = set()
    for pos, entry in enumerate(data["images"]):
        if not isinstance(entry, dict) or "filename" not in entry or not isinstance(entry.get("sentences"), list):
            raise ValueError(f'{json_path}: images[{pos}] needs "filename" and a "sentences" list')
        seen_splits.add(str(entry.get("split")))
        if entry.get("split") not in wanted:
            continue
        filename = entry["filename"]
        image_id = str(entry["cocoid"] if "cocoid" in entry else entry.get("imgid", Path(filename).stem))
        sentences = entry["sentences"]
        if len(sentences) < captions_per_image:
            if short_images == "drop":
                dropped.append(image_id)
                continue
            raise ValueError(
                f"{json_path}: image {image_id} ({filename}) has {len(sentences)} captions, "
                f"expected at least {captions_per_image} (pass short_images='drop' to skip such images)"
            )
        sentids = entry.get("sentids", [])
        for j, sentence in enumerate(sentences[:captions_per_image]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            sentid = (
                sentence.get("sentid", sentids[j] if j < len(sentids) else None) if isinstance(sentence, dict) else None
            )
            sentid = f"{image_id}#{j}" if sentid is None else str(sentid)
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError(f"{json_path}: empty caption (sentid {sentid}) of image {image_id} ({filename})")
            captions.append(raw)
            caption_ids.append(sentid)
        image_ids.append(image_id)
        paths.append(root / entry["filepath"] / filename if "filepath" in entry else root / filename)
    if dropped:
        logger.warning(
            "%s: dropped %d %s images with fewer than %d captions (first: %s)",
            json_path,
            len(dropped),
            split,
            captions_per_image,
            ", ".join(dropped[:5]),
        )
    if not image_ids:
        raise ValueError(f"{json_path}: no image with split in {list(wanted)}; splits present: {sorted(seen_splits)}")
    logger.info("%s: %s split, %d images, %d captions", json_path.name, split, len(image_ids), len(captions))
    return SplitIndex(
        name=split,
        image_ids=image_ids,
        image_paths=paths,
        captions=captions,
        caption_ids=caption_ids,
        caption_to_image=_image_major(len(image_ids), captions_per_image),
        captions_per_image=captions_per_image,
        dataset=str(data.get("dataset", "")),
    )


def missing_images(index: SplitIndex) -> list[Path]:
    """Image paths of ``index`` that are not existing files (empty for precomputed features)."""
    if index.image_paths is None:
        return []
    return [p for p in index.image_paths if not p.is_file()]


def _read_lines(path: Path) -> list[str]:
    """Lines without their terminator; only "\\n" splits (captions may hold other Unicode separators)."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_precomp(
    root: str | Path, split: str, captions_per_image: int = 5, *, verify_images: int = 16
) -> tuple[SplitIndex, np.ndarray]:
    """Read SCAN/VSE-infinity precomputed BUTD features ``{split}_ims.npy`` + ``{split}_caps.txt`` (DATA §4).

    Two row layouts are detected: per image (``n_caps == cpi * n_rows``) and per caption (``n_caps == n_rows``, each
    image row repeated ``cpi`` times, kuanghuei/SCAN#65). For the latter, rows ``cpi*i .. cpi*i+cpi-1`` of
    ``verify_images`` evenly spaced images are checked to be identical, and ``region_rows`` keeps every cpi-th row.
    ``split="val"`` falls back to ``dev`` when only ``dev_*`` files exist.

    Args:
        root: folder holding the precomp files.
        split: file prefix ("train", "dev", "test", "testall", or "val").
        captions_per_image: captions per image.
        verify_images: how many images to check in the per-caption layout.

    Returns:
        (index, features): ``features`` is the float [n_rows, N, D] array opened with ``mmap_mode="r"``; image ``i``
        is ``features[index.region_rows[i]]``.

    Raises:
        FileNotFoundError: ``{split}_ims.npy`` or ``{split}_caps.txt`` missing.
        ValueError: wrong ndim, inconsistent counts, non-identical repeated rows, empty captions, bad ids file.
    """
    root = Path(root)
    if split == "val" and not (root / "val_ims.npy").exists() and (root / "dev_ims.npy").exists():
        logger.info("%s: no val_ims.npy, reading the dev split", root)
        split = "dev"
    ims_path, caps_path, ids_path = (root / f"{split}_{s}" for s in ("ims.npy", "caps.txt", "ids.txt"))
    for path in (ims_path, caps_path):
        if not path.is_file():
            present = sorted(p.name[: -len("_ims.npy")] for p in root.glob("*_ims.npy"))
            raise FileNotFoundError(f"precomp file not found: {path} (splits present in {root}: {present})")
    features = np.load(ims_path, mmap_mode="r")
    if features.ndim != 3:
        raise ValueError(f"{ims_path}: expected a 3-D array (n_rows, N, D), got shape {features.shape}")
    captions = _read_lines(caps_path)
    n_rows, n_caps, cpi = features.shape[0], len(captions), captions_per_image
    if n_rows == 0:
        raise ValueError(f"{ims_path}: empty feature array")
    if n_caps == cpi * n_rows:
        layout, n_images = "per-image", n_rows
        region_rows = np.arange(n_rows, dtype=np.int64)  # [n_images]
    elif n_caps == n_rows and n_rows % cpi == 0:
        layout, n_images = "per-caption", n_rows // cpi
        region_rows = np.arange(0, n_rows, cpi, dtype=np.int64)  # [n_images]
        checked = np.unique(np.linspace(0, n_images - 1, num=min(verify_images, n_images)).astype(np.int64))
        for i in checked:
            block = np.asarray(features[cpi * i : cpi * i + cpi])  # [cpi, N, D]
            if not (block == block[:1]).all():
                raise ValueError(
                    f"{ims_path}: {n_rows} rows for {n_caps} captions looks like one row per caption, but rows "
                    f"{cpi * i}..{cpi * i + cpi - 1} (image {i}) are not identical"
                )
    else:
        raise ValueError(
            f"{ims_path}: {n_rows} feature rows do not fit {n_caps} captions in {caps_path} "
            f"(expected {n_caps} = {cpi} x rows, or one row per caption)"
        )
    logger.info("%s: %s layout, %d images, %d captions", ims_path, layout, n_images, n_caps)
    for c, caption in enumerate(captions):
        if not caption.strip():
            raise ValueError(f"{caps_path}: empty caption on line {c + 1} (image {c // cpi})")
    if ids_path.is_file():
        ids = _read_lines(ids_path)
        if len(ids) == n_images:
            image_ids = ids
        elif len(ids) == n_caps and n_caps != n_images:
            groups = [ids[cpi * i : cpi * i + cpi] for i in range(n_images)]
            if any(len(set(g)) != 1 for g in groups):
                raise ValueError(f"{ids_path}: {len(ids)} ids, one per caption, but they differ within an image")
            image_ids = [g[0] for g in groups]
        else:
            raise ValueError(f"{ids_path}: {len(ids)} ids, expected {n_images} (images) or {n_caps} (captions)")
    else:
        logger.info("%s: no ids file, image ids are row numbers", root)
        image_ids = [str(i) for i in range(n_images)]
    index = SplitIndex(
        name=split,
        image_ids=image_ids,
        image_paths=None,
        captions=captions,
        caption_ids=[str(c) for c in range(n_caps)],
        caption_to_image=_image_major(n_images, cpi),
        captions_per_image=cpi,
        region_rows=region_rows,
        dataset="precomp",
    )
    return index, features


def align_region_rows(index: SplitIndex, row_ids: Sequence[str]) -> SplitIndex:
    """A copy of ``index`` whose ``region_rows`` point each image at its row in a region array with ids ``row_ids``.

    Raises:
        ValueError: an image id of ``index`` is not in ``row_ids`` (the first few are named).
    """
    position = {str(r): i for i, r in enumerate(row_ids)}
    missing = [i for i in index.image_ids if i not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} of {index.n_images} images of split {index.name!r} have no region row "
            f"(first: {missing[:5]})"
        )
    rows = np.array([position[i] for i in index.image_ids], dtype=np.int64)  # [n_images]
    return dataclasses.replace(index, region_rows=rows)


def five_fold_slices(n_images: int, fold_images: int = 1000, captions_per_image: int = 5) -> list[tuple[slice, slice]]:
    """COCO 1K protocol (M§6): consecutive folds of ``fold_images`` images and their captions.

    Returns:
        ``[(image_slice, caption_slice), ...]``: fold f holds images ``[fold_images*f, fold_images*(f+1))`` and captions
        ``[cpi*fold_images*f, cpi*fold_images*(f+1))``.

    Raises:
        ValueError: non-positive sizes or ``n_images`` not a multiple of ``fold_images``.
    """
    if n_images < 1 or fold_images < 1 or captions_per_image < 1:
        raise ValueError(f"sizes must be >= 1, got {n_images=}, {fold_images=}, {captions_per_image=}")
    if n_images % fold_images:
        raise ValueError(f"n_images={n_images} is not a multiple of fold_images={fold_images}")
    cf = captions_per_image * fold_images
    return [
        (slice(f * fold_images, (f + 1) * fold_images), slice(f * cf, (f + 1) * cf))
        for f in range(n_images // fold_images)
    ]
