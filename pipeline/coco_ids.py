"""COCO ids of an evaluated split, and the plausible-match (PMRP) sets, for the `eccv_caption` benchmarks.

The benchmarks key every query and gallery item by COCO ids: integer image ids and caption *annotation* ids
(``captions_val2014.json`` ``annotations[].id``). Our embedding stores keep the ids of the source files: Karpathy
``cocoid`` (an image id already) and ``sentid`` (Karpathy's own sentence number), or for SCAN precomp files the line
of ``{split}_ids.txt`` and the line number of the caption. `map_caption_ids` turns them into annotation ids exactly:
each caption is matched, by its raw text, to the one annotation of the same image with that text (whitespace
collapsed, nothing else); a caption with no match, with two matching annotations (two equal captions of one image),
or matched twice, and an image absent from the annotations, each stop the run with one line naming the file and item.
Nothing is guessed: ``sentid`` values are never assumed to be annotation ids.

Plausible matches (PCME, Chun et al. 2021, §5.1; eccv-caption ``data_tools/plausible_matching_func.py``): each image
gets a binary code of the 90 COCO category ids present in its instance annotations (``instances_val2014.json``);
images whose codes differ in at most zeta positions (Hamming distance <= zeta) plausibly match, and so do their
captions. Images without any instance annotation have no code and take no part. `plausible_match_sets` with
``zeta=2, omit_original=True`` builds exactly the ``pm_image_to_caption.json`` / ``pm_caption_to_image.json`` that
eccv-caption's ``merge.py`` ships (``pm_thres=2``, ``omit_orig=True``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

N_CATEGORIES = 90  # COCO category ids run 1..90 (80 used); PCME codes them as 90 bits
PM_FILES = ("pm_image_to_caption.json", "pm_caption_to_image.json")


class CocoIdError(ValueError):
    """The COCO ids of the split cannot be established; the message names the file that is needed or wrong."""


@dataclass(frozen=True)
class CocoIds:
    """COCO ids of one split, keyed by the embedding store's ids.

    Attributes:
        images: store image id -> COCO image id.
        captions: store caption id -> COCO caption annotation id.
        caption_images: store caption id -> COCO image id of the caption's image.
    """

    images: dict[str, int]
    captions: dict[str, int]
    caption_images: dict[str, int]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CocoIdError(f"no {what} at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CocoIdError(f"{path} is not valid JSON ({e}); expected the COCO {what}") from None


def read_caption_annotations(captions_json: str | Path) -> dict[int, list[tuple[int, str]]]:
    """``captions_val2014.json`` -> ``{image_id: [(annotation id, caption), ...]}`` in file order.

    Raises:
        CocoIdError: missing or malformed file.
    """
    data = _read_json(captions_json, "COCO captions file (captions_val2014.json)")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise CocoIdError(f'{captions_json}: no "annotations" list; expected the COCO captions_val2014.json')
    by_image: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in anns:
        try:
            by_image[int(ann["image_id"])].append((int(ann["id"]), str(ann["caption"])))
        except (KeyError, TypeError, ValueError):
            raise CocoIdError(
                f'{captions_json}: annotation {str(ann)[:80]} lacks an integer "image_id"/"id" or a "caption"'
            ) from None
    return dict(by_image)


def map_caption_ids(
    image_ids: list[str],
    caption_ids: list[str],
    captions: list[str],
    captions_per_image: int,
    captions_json: str | Path,
    *,
    source: str = "the split",
) -> CocoIds:
    """Match every caption of an image-major split to its COCO caption annotation by raw text.

    Args:
        image_ids: [n] store image ids; each must be a COCO image id (Karpathy ``cocoid``, precomp ``ids.txt``).
        caption_ids: [C] store caption ids, image-major (captions of image i at ``cpi*i .. cpi*i + cpi - 1``).
        captions: [C] raw caption texts in the same order.
        captions_per_image: cpi.
        captions_json: the user's COCO ``captions_val2014.json``.
        source: the file the split came from (named in errors).

    Returns:
        The split's `CocoIds`; verified one-to-one (no two captions share an annotation).

    Raises:
        CocoIdError: an image id that is not an integer or not in ``captions_json``; a caption with no annotation of
            the same image with its text; one matching several annotations; two captions matching one annotation.
    """
    cpi = captions_per_image
    if len(caption_ids) != cpi * len(image_ids) or len(captions) != len(caption_ids):
        raise ValueError(
            f"expected {len(image_ids)} images x {cpi} captions, got {len(caption_ids)} ids, {len(captions)} texts"
        )
    by_image = read_caption_annotations(captions_json)
    images: dict[str, int] = {}
    out: dict[str, int] = {}
    out_images: dict[str, int] = {}
    used: dict[int, str] = {}
    for i, store_image in enumerate(image_ids):
        try:
            coco_image = int(store_image)
        except ValueError:
            raise CocoIdError(
                f"image id {store_image!r} of {source} is not a COCO image id; COCO benchmarks need dataset_coco.json "
                "(cocoid) or the precomp ids file ({split}_ids.txt)"
            ) from None
        anns = by_image.get(coco_image)
        if anns is None:
            raise CocoIdError(
                f"image {coco_image} of {source} has no caption in {captions_json}; COCO benchmarks need "
                "captions_val2014.json (the 5K test images are val2014 images)"
            )
        texts: dict[str, list[int]] = defaultdict(list)
        for ann_id, text in anns:
            texts[_normalise(text)].append(ann_id)
        images[store_image] = coco_image
        for c in range(cpi * i, cpi * i + cpi):
            matches = texts.get(_normalise(captions[c]), [])
            if not matches:
                raise CocoIdError(
                    f"caption {caption_ids[c]} of image {coco_image} ({captions[c]!r}) in {source} matches no "
                    f"caption of that image in {captions_json}; is it the captions_val2014.json of this split?"
                )
            if len(matches) > 1:
                raise CocoIdError(
                    f"caption {caption_ids[c]} of image {coco_image} ({captions[c]!r}) in {source} matches "
                    f"{len(matches)} annotations {sorted(matches)} of that image in {captions_json} (equal captions); "
                    "the mapping is ambiguous"
                )
            ann_id = matches[0]
            if ann_id in used:
                raise CocoIdError(
                    f"captions {used[ann_id]} and {caption_ids[c]} of image {coco_image} in {source} both match "
                    f"annotation {ann_id} ({captions[c]!r}) of {captions_json}; the mapping is not one-to-one"
                )
            used[ann_id] = caption_ids[c]
            out[caption_ids[c]] = ann_id
            out_images[caption_ids[c]] = coco_image
    return CocoIds(images=images, captions=out, caption_images=out_images)


def split_coco_ids(
    source: str,
    split: str,
    captions_per_image: int,
    captions_json: str | Path | None,
    *,
    dataset_json: str | Path | None = None,
    precomp_root: str | Path | None = None,
) -> CocoIds:
    """`CocoIds` of ``split`` read from the same source as the extract stage (Karpathy JSON or precomp folder).

    Raises:
        CocoIdError: no ``captions_json`` given, or the mapping fails (see `map_caption_ids`).
    """
    from setemb.data import read_karpathy, read_precomp

    if not captions_json:
        raise CocoIdError("COCO benchmarks need the COCO captions file captions_val2014.json: set paths.coco_captions")
    if source == "precomp" and precomp_root and Path(precomp_root).is_dir():
        index = read_precomp(precomp_root, split, captions_per_image)[0]
        where = f"{precomp_root}/{index.name}_caps.txt"
        if not (Path(precomp_root) / f"{index.name}_ids.txt").is_file():
            raise CocoIdError(
                f"COCO benchmarks need the precomp image ids file {Path(precomp_root) / f'{index.name}_ids.txt'}"
            )
    else:
        if not dataset_json or not Path(dataset_json).is_file():
            raise CocoIdError(f"COCO benchmarks need the Karpathy split file dataset_coco.json (paths.dataset_json: "
                              f"{dataset_json!r})")  # fmt: skip
        index = read_karpathy(dataset_json, ".", split, captions_per_image)
        where = str(dataset_json)
    return map_caption_ids(
        index.image_ids, index.caption_ids, index.captions, index.captions_per_image, captions_json, source=where
    )


# ------------------------------------------------------------------------------------------- plausible matches
def category_codes(instances_json: str | Path, image_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """PCME's per-image category code: bit ``category_id - 1`` set when the image has an instance of it.

    Returns:
        ``(coded_ids [M] int64, codes [M, 90] bool)`` for the images of ``image_ids`` with at least one instance
        annotation, in ``image_ids`` order (the others have no code and no plausible match).

    Raises:
        CocoIdError: missing or malformed ``instances_val2014.json``.
    """
    data = _read_json(instances_json, "COCO instances file (instances_val2014.json)")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise CocoIdError(f'{instances_json}: no "annotations" list; expected the COCO instances_val2014.json')
    row = {int(i): r for r, i in enumerate(image_ids)}
    codes = np.zeros((len(image_ids), N_CATEGORIES), dtype=bool)  # [n, 90]
    for ann in anns:
        try:
            r, category = row.get(int(ann["image_id"])), int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            raise CocoIdError(f'{instances_json}: annotation {str(ann)[:80]} lacks "image_id"/"category_id"') from None
        if r is not None:
            if not 1 <= category <= N_CATEGORIES:
                raise CocoIdError(f"{instances_json}: category_id {category} outside 1..{N_CATEGORIES}")
            codes[r, category - 1] = True
    coded = codes.any(axis=1)
    return np.asarray(image_ids, dtype=np.int64)[coded], codes[coded]


def plausible_match_sets(
    codes: np.ndarray,
    coded_ids: np.ndarray,
    image_to_captions: dict[int, list[int]],
    zeta: int,
    *,
    omit_original: bool = True,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Plausible-match ground truth of PCME §5.1 at Hamming threshold ``zeta``, as eccv-caption builds it.

    Image a plausibly matches image b when ``hamming(code_a, code_b) <= zeta``; then a matches b's captions (i2t) and
    each caption of a matches b (t2i). With ``omit_original`` an image's own pair is removed (eccv-caption's
    ``omit_orig=True``, the convention of its ``pm_*.json``), so an item's own image/captions are not in its set.

    Args:
        codes: [M, 90] bool category codes (`category_codes`). coded_ids: [M] COCO image ids of those rows.
        image_to_captions: COCO image id -> its caption annotation ids (the original COCO pairs).
        zeta: Hamming threshold (PCME uses 0, 1, 2).

    Returns:
        ``(i2t, t2i)``: image id -> plausible caption ids, caption id -> plausible image ids (sorted lists; queries
        whose set is empty are left out, as the package's files do).
    """
    c = codes.astype(np.float32)  # [M, 90]; 0/1 products summed over 90 bits are exact in float32 (BLAS matmul)
    hamming = c @ (1 - c).T + (1 - c) @ c.T  # [M, M] count of differing bits
    match = hamming <= zeta  # [M, M]
    if omit_original:
        np.fill_diagonal(match, False)
    i2t: dict[int, list[int]] = {}
    t2i_sets: dict[int, set[int]] = defaultdict(set)
    ids = coded_ids.tolist()
    for a, row in enumerate(match):
        partners = [ids[b] for b in np.flatnonzero(row)]
        if not partners:
            continue
        i2t[ids[a]] = sorted(cid for b in partners for cid in image_to_captions[b])
        for cid in image_to_captions[ids[a]]:
            t2i_sets[int(cid)].update(partners)
    return i2t, {cid: sorted(v) for cid, v in t2i_sets.items()}


def read_pm_files(pm_dir: str | Path) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The package's ``pm_image_to_caption.json`` / ``pm_caption_to_image.json`` from ``pm_dir`` (int keys).

    Raises:
        CocoIdError: a file is missing.
    """
    out = []
    for name in PM_FILES:
        data = _read_json(Path(pm_dir) / name, f"eccv-caption plausible-match file ({name})")
        out.append({int(k): [int(x) for x in v] for k, v in data.items()})
    return out[0], out[1]
