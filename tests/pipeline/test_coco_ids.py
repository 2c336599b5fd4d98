"""COCO id mapping (Karpathy / precomp -> caption annotation ids) and plausible-match sets, on fabricated files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.coco_ids import CocoIdError, category_codes, plausible_match_sets, split_coco_ids

# Two test images; sentids (Karpathy's numbering) deliberately differ from the annotation ids.
IMAGES = {
    11: [(501, "A dog on a couch."), (502, "a brown dog  sleeping"), (503, "Dog resting.")],
    22: [(601, "Two cats."), (602, "A cat and a cat."), (603, "Cats on a bed"), (604, "an extra 4th caption")],
}


def write_karpathy(path: Path, images: dict[int, list[str]], split: str = "test") -> Path:
    entries, sentid = [], 9000
    for n, (cocoid, texts) in enumerate(images.items()):
        sentences = []
        for text in texts:
            sentences.append({"raw": text, "tokens": text.lower().split(), "imgid": n, "sentid": sentid})
            sentid += 1
        entries.append({"filepath": "val2014", "filename": f"COCO_val2014_{cocoid:012d}.jpg", "cocoid": cocoid,
                        "imgid": n, "split": split, "sentids": [s["sentid"] for s in sentences],
                        "sentences": sentences})  # fmt: skip
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def write_captions(path: Path, images: dict[int, list[tuple[int, str]]]) -> Path:
    anns = [{"image_id": iid, "id": aid, "caption": text} for iid, pairs in images.items() for aid, text in pairs]
    path.write_text(json.dumps({"images": [{"id": i} for i in images], "annotations": anns[::-1]}))
    return path


def karpathy_ids(tmp_path: Path, karpathy: dict[int, list[str]], captions: dict = IMAGES, cpi: int = 3):
    return split_coco_ids(
        "karpathy", "test", cpi, write_captions(tmp_path / "captions_val2014.json", captions),
        dataset_json=write_karpathy(tmp_path / "dataset_coco.json", karpathy),
    )  # fmt: skip


def test_karpathy_captions_map_to_annotations_by_text(tmp_path: Path) -> None:
    # Karpathy order differs from the annotation order; whitespace differences do not matter; extra captions dropped.
    karpathy = {
        22: ["Cats on a bed", "Two cats.", "A cat and a cat.", "an extra 4th caption"],
        11: ["Dog resting. ", "A dog on a couch.", "a brown dog sleeping"],
    }
    ids = karpathy_ids(tmp_path, karpathy)
    assert ids.images == {"22": 22, "11": 11}
    assert ids.captions == {"9000": 603, "9001": 601, "9002": 602, "9004": 503, "9005": 501, "9006": 502}
    assert ids.caption_images == {"9000": 22, "9001": 22, "9002": 22, "9004": 11, "9005": 11, "9006": 11}


def test_a_caption_without_a_match_names_it(tmp_path: Path) -> None:
    karpathy = {11: ["A dog on a couch.", "a brown dog sleeping", "A dog resting."]}
    with pytest.raises(CocoIdError, match=r"caption 9002 of image 11 \('A dog resting.'\).*matches no caption"):
        karpathy_ids(tmp_path, karpathy)


def test_a_caption_of_another_image_does_not_match(tmp_path: Path) -> None:
    karpathy = {11: ["A dog on a couch.", "a brown dog sleeping", "Two cats."]}  # text of image 22
    with pytest.raises(CocoIdError, match="matches no caption of that image"):
        karpathy_ids(tmp_path, karpathy)


def test_two_equal_captions_of_one_image_are_ambiguous(tmp_path: Path) -> None:
    captions = {11: [*IMAGES[11], (504, "A dog on a couch.")]}
    karpathy = {11: ["A dog on a couch.", "a brown dog sleeping", "Dog resting."]}
    with pytest.raises(CocoIdError, match=r"matches 2 annotations \[501, 504\].*ambiguous"):
        karpathy_ids(tmp_path, karpathy, captions)
    twice = {11: ["A dog on a couch.", "A dog on a couch.", "Dog resting."]}  # Karpathy repeats, COCO has it once
    with pytest.raises(CocoIdError, match="both match annotation 501.*not one-to-one"):
        karpathy_ids(tmp_path, twice)


def test_an_image_missing_from_the_annotations_names_the_file(tmp_path: Path) -> None:
    karpathy = {11: ["A dog on a couch.", "a brown dog sleeping", "Dog resting."], 33: ["x", "y", "z"]}
    with pytest.raises(CocoIdError, match="image 33 .* has no caption in .*captions_val2014.json"):
        karpathy_ids(tmp_path, karpathy)


def test_missing_files_name_what_is_needed(tmp_path: Path) -> None:
    with pytest.raises(CocoIdError, match="need the COCO captions file captions_val2014.json"):
        split_coco_ids("karpathy", "test", 5, None, dataset_json=tmp_path / "d.json")
    with pytest.raises(CocoIdError, match="need the Karpathy split file dataset_coco.json"):
        split_coco_ids("karpathy", "test", 5, tmp_path / "c.json", dataset_json=tmp_path / "d.json")
    write_karpathy(tmp_path / "d.json", {11: ["A dog on a couch.", "a brown dog sleeping", "Dog resting."]})
    with pytest.raises(CocoIdError, match="no COCO captions file .* at .*c.json"):
        split_coco_ids("karpathy", "test", 3, tmp_path / "c.json", dataset_json=tmp_path / "d.json")


def test_precomp_captions_map_through_the_ids_file(tmp_path: Path) -> None:
    root = tmp_path / "precomp"
    root.mkdir()
    np.save(root / "test_ims.npy", np.zeros((2, 2, 4), dtype=np.float32))
    (root / "test_caps.txt").write_text("Dog resting.\nA dog on a couch.\na brown dog sleeping\n"
                                        "Two cats.\nCats on a bed\nA cat and a cat.\n")  # fmt: skip
    captions = write_captions(tmp_path / "captions_val2014.json", IMAGES)
    with pytest.raises(CocoIdError, match="precomp image ids file .*test_ids.txt"):
        split_coco_ids("precomp", "test", 3, captions, precomp_root=root)
    (root / "test_ids.txt").write_text("11\n22\n")
    ids = split_coco_ids("precomp", "test", 3, captions, precomp_root=root)
    assert ids.captions == {"0": 503, "1": 501, "2": 502, "3": 601, "4": 603, "5": 602}
    (root / "test_ids.txt").write_text("0\n1\n")  # row numbers, not COCO ids
    with pytest.raises(CocoIdError, match="image 0 of .* has no caption"):
        split_coco_ids("precomp", "test", 3, captions, precomp_root=root)


def test_plausible_matches_follow_the_hamming_rule(tmp_path: Path) -> None:
    # categories: image 1 {1,2,3}, image 2 {1,2} (distance 1), image 3 {1,2,3,4,5} (2 from 1, 3 from 2), image 4 none.
    labels = {1: [1, 2, 3], 2: [1, 2, 2], 3: [1, 2, 3, 4, 5]}
    anns = [{"image_id": i, "category_id": c} for i, cs in labels.items() for c in cs]
    anns.append({"image_id": 99, "category_id": 7})  # not in the split
    (tmp_path / "instances_val2014.json").write_text(json.dumps({"annotations": anns}))
    coded, codes = category_codes(tmp_path / "instances_val2014.json", [4, 3, 2, 1])
    assert coded.tolist() == [3, 2, 1] and codes.sum(axis=1).tolist() == [5, 2, 3]
    captions = {1: [10, 11], 2: [20], 3: [30], 4: [40]}
    i2t, t2i = plausible_match_sets(codes, coded, captions, zeta=2)
    assert i2t == {3: [10, 11], 2: [10, 11], 1: [20, 30]}
    assert t2i == {30: [1], 20: [1], 10: [2, 3], 11: [2, 3]}
    i2t0, t2i0 = plausible_match_sets(codes, coded, captions, zeta=0, omit_original=False)
    assert i2t0 == {3: [30], 2: [20], 1: [10, 11]} and t2i0 == {30: [3], 20: [2], 10: [1], 11: [1]}
    i2t1, _ = plausible_match_sets(codes, coded, captions, zeta=1, omit_original=False)
    assert i2t1 == {3: [30], 2: [10, 11, 20], 1: [10, 11, 20]}
