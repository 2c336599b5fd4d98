"""The one typed schema of params.yaml, and its only reader (`load_params`).

Every model forbids unknown keys and is frozen, so a misspelled key or a wrong type fails before any work, with the
dotted path of the offending key. Defaults live here and nowhere else; setemb never sees these objects (stages pass
``model_dump()`` dicts to setemb constructors).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message has one line per problem."""


# --------------------------------------------------------------------------------------------------------- paths
class PathsParams(_Strict):
    """Every artifact path, defined once; dvc.yaml interpolates ``${paths.*}`` into stage options."""

    shapes: str = "data/shapes"
    dataset_json: str = "data/shapes/dataset.json"
    image_root: str = "data/shapes/images"
    relevance: str = Field("data/shapes/relevance.json", description='exhaustive relevance file; "" = none')
    precomp_root: str | None = None
    coco_captions: str = Field("", description='COCO captions_val2014.json for the COCO benchmarks; "" = none')
    coco_instances: str = Field("", description='COCO instances_val2014.json for pmrp; "" = none')
    coco_pm_dir: str = Field("", description='folder with eccv-caption pm_*.json (pmrp); "" = compute them')
    features: str = "artifacts/features.zarr"
    training: str = "artifacts/training"
    model: str = "artifacts/model"
    embeddings: str = "artifacts/embeddings.zarr"
    index: str = "artifacts/index"
    reports: str = "reports"
    metrics: str = "metrics.json"
    plots: str = "plots"
    dvclive: str = "dvclive"


# ------------------------------------------------------------------------------------------------------- prepare
class PrepareParams(_Strict):
    """The embedded `shapes` dataset (Karpathy JSON + images), generated deterministically from the seed."""

    profile: Literal["demo", "study", "tiny"] = "demo"
    image_size: int | None = Field(None, ge=32, le=1024)
    train_images: int | None = Field(None, gt=0)
    val_images: int | None = Field(None, gt=0)
    test_images: int | None = Field(None, gt=0)


# ------------------------------------------------------------------------------------------------------- extract
class GloveParams(_Strict):
    vectors: str | None = None
    min_count: int = Field(1, ge=1)


class ExtractParams(_Strict):
    """Frozen backbones -> Zarr feature cache."""

    source: Literal["karpathy", "precomp"] = "karpathy"
    image_backbone: Literal["efficientnet_lite0", "resnet152", "resnext101", "precomputed"] = "efficientnet_lite0"
    text_backbone: Literal["minilm", "bert", "glove"] = "minilm"
    image_weights: str | None = None
    image_transform: Literal["resize", "center_crop"] = Field(
        "center_crop",
        description="test-time image transform of the CNN backbones: center_crop = resize the short side to "
        "input/0.875, keep the centre (drops 23% of a square image); resize = the whole image squashed to the input",
    )
    text_weights: str | None = None
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "val", "test"])
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = Field(32, gt=0)
    items_per_unit: int = Field(256, gt=0)
    workers: int = Field(0, ge=0, description="parallel extraction workers; 0 = one per CPU core (per GPU on cuda)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when CUDA and Ray see GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs each cuda worker holds (Ray num_gpus)")
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="autocast dtype; auto = float16 on cuda, float32 on cpu; float32 forces full precision"
    )
    on_bad_image: Literal["fail", "skip"] = "fail"
    captions_per_image: int = Field(5, gt=0)
    glove: GloveParams = Field(default_factory=GloveParams)

    @model_validator(mode="after")
    def _precomputed_pairs_with_precomp(self) -> ExtractParams:
        if (self.image_backbone == "precomputed") != (self.source == "precomp"):
            raise ValueError(
                f"extract.image_backbone={self.image_backbone!r} needs extract.source="
                f"{'precomp' if self.image_backbone == 'precomputed' else 'karpathy'!r}, got {self.source!r}"
            )
        return self

    @model_validator(mode="after")
    def _float16_needs_cuda(self) -> ExtractParams:
        if self.precision == "float16" and self.device == "cpu":
            raise ValueError("extract.precision=float16 needs extract.device cuda or auto; on cpu use bfloat16")
        return self


# --------------------------------------------------------------------------------------------------------- train
class ModelParams(_Strict):
    """Keyword arguments of ``setemb.model.create_model``."""

    embed_dim: int = Field(1024, gt=0)
    num_embeddings: int = Field(4, gt=0, le=64)
    text_num_embeddings: int | None = Field(None, gt=0, le=64)
    head: Literal["slot", "transformer", "pienet", "probabilistic", "single_vector"] = "slot"
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    image_head_kwargs: dict[str, Any] = Field(default_factory=dict)
    text_head_kwargs: dict[str, Any] = Field(default_factory=dict)
    image_encoder: Literal["grid", "region"] = "grid"
    image_encoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    text_encoder: Literal["token", "bigru"] = "token"
    text_encoder_kwargs: dict[str, Any] = Field(default_factory=dict)
    token_drop: float = Field(0.2, ge=0.0, lt=1.0)


class LossParams(_Strict):
    """Keyword arguments of ``setemb.losses.create_loss`` (``name`` picks the loss)."""

    name: Literal["triplet", "pcme", "pcmepp"] = "triplet"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class OptimParams(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int = Field(10, gt=0)
    warmup_epochs: float = Field(0.5, ge=0)
    head_lr_scale: float = Field(1.0, gt=0)
    encoder_lr_scale: float = Field(1.0, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    amp: bool = True
    no_mining_epochs: int = Field(0, ge=0, description="epochs of triplet loss over all negatives (warm-up)")


class RayParams(_Strict):
    num_workers: int = Field(2, ge=0, description="Ray Train workers; 0 runs the loop in-process (local mode)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1)
    address: str | None = None


class TrainDataParams(_Strict):
    """How training reads the feature store (setemb/streaming.py): never a whole split in memory."""

    shuffle: Literal["blocks", "full"] = Field(
        "blocks", description="blocks: shuffled blocks + a shuffle window; full: a uniform permutation (item reads)"
    )
    block_images: int = Field(64, gt=0, description="images per contiguous store read (captions: times cpi)")
    window_blocks: int = Field(16, gt=0, description="blocks shuffled together: the shuffle buffer")
    prefetch_batches: int = Field(2, ge=0, description="batches read ahead in a background thread (0 = inline)")


class TrainParams(_Strict):
    images_per_batch: int = Field(128, gt=1)
    data: TrainDataParams = Field(default_factory=TrainDataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    loss: LossParams = Field(default_factory=LossParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    ray: RayParams = Field(default_factory=RayParams)
    eval_block_size: int = Field(256, gt=0)
    limit_batches: int | None = Field(None, gt=0, description="stop each epoch after N batches (smoke tests)")


# --------------------------------------------------------------------------------------------- embed / evaluate
class EmbedParams(_Strict):
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["test"])
    batch_size: int = Field(256, gt=0)
    save_attention: bool = True


class EvaluateParams(_Strict):
    split: Literal["val", "test"] = "test"
    protocol: Literal["auto", "full", "five_fold_1k"] = "auto"
    similarity: str | None = Field(None, description="override the trained similarity; null = as trained")
    similarity_kwargs: dict[str, Any] = Field(default_factory=dict)
    block_size: int = Field(256, gt=0)
    image_elements: list[int] | None = Field(None, description="evaluate with a subset of image set elements (Table 5)")
    text_elements: list[int] | None = None
    recall_ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    benchmarks: list[Literal["recall", "eccv_caption", "cxc", "pmrp"]] = Field(
        default_factory=lambda: ["recall"], description="recall (always) + COCO 5K benchmarks via eccv_caption"
    )
    benchmark_ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="R@K cut-offs of cxc")
    pmrp_zeta: int = Field(2, ge=0, le=2, description="PCME's Hamming threshold of plausible matches (files: 2)")

    @field_validator("recall_ks", "benchmark_ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k <= 0 for k in v):
            raise ValueError(f"must be positive integers, got {v}")
        return sorted(set(v))

    @field_validator("benchmarks")
    @classmethod
    def _recall_first(cls, v: list[str]) -> list[str]:
        if "recall" not in v or len(set(v)) != len(v):
            raise ValueError(f"must list recall (the stage's own protocol always runs) and no name twice, got {v}")
        return v


class IndexParams(_Strict):
    """The searchable set index built from the embedding store: ``setemb.index.SetIndex`` (flat / ivf / hnsw: float
    element copies + re-ranking vectors in RAM) or ``setemb.index.compressed.CompressedSetIndex`` (ivf_sq8 / ivf_pq:
    element codes only, re-ranking from the embedding store on disk)."""

    split: Literal["val", "test", "train"] = "test"
    modalities: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], min_length=1)
    kind: Literal["auto", "flat", "ivf", "hnsw", "ivf_sq8", "ivf_pq"] = "auto"
    candidates_per_element: int = Field(64, gt=0)
    nlist: int | None = Field(None, gt=0)
    nprobe: int | None = Field(None, gt=0)
    hnsw_m: int = Field(32, gt=0)
    ef_search: int = Field(128, gt=0)
    storage_dtype: Literal["float16", "float32"] = "float16"
    pq_m: int = Field(32, gt=0, description="ivf_pq: sub-quantizers per element (must divide D); bytes = m*bits/8")
    pq_bits: int = Field(8, ge=1, le=16, description="ivf_pq: bits per sub-quantizer code (2^bits centroids)")
    rerank_depth: int = Field(64, gt=0, description="ivf_sq8 / ivf_pq: items per query re-ranked exactly (>= k)")
    rerank_cache_mb: float = Field(64.0, ge=0, description="ivf_sq8 / ivf_pq: re-ranking row cache (MiB; 0 = off)")
    top_k: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> IndexParams:
        if self.nlist is not None and self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"index.nprobe={self.nprobe} probes more lists than index.nlist={self.nlist} has")
        return self


class ReportParams(_Strict):
    """Attention figures (DivE Figure 4) and the static HTML retrieval gallery (stages/report.py)."""

    split: Literal["train", "val", "test"] = Field("test", description="embedding-store split to report on")
    num_images: int = Field(6, ge=0, description="images with an attention figure (DivE Figure 4)")
    num_text_queries: int = Field(5, ge=0, description="captions queried against the images in the gallery")
    num_image_queries: int = Field(5, ge=0, description="images queried against the captions in the gallery")
    top_k: int = Field(5, gt=0, description="results per gallery query")
    panel_px: int = Field(256, ge=96, description="side of one attention panel in pixels")
    thumbnail_px: int = Field(160, ge=32, description="longest side of gallery thumbnails")
    colormap: str = "jet"
    alpha: float = Field(0.6, ge=0.0, le=1.0, description="weight of the colormap in the blend")
    similarity: str | None = Field(None, description="gallery ranking similarity; null = as trained")
    similarity_kwargs: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- root
class Params(_Strict):
    seed: int = 0
    paths: PathsParams = Field(default_factory=PathsParams)
    prepare: PrepareParams = Field(default_factory=PrepareParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    train: TrainParams = Field(default_factory=TrainParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    index: IndexParams = Field(default_factory=IndexParams)
    report: ReportParams = Field(default_factory=ReportParams)

    @model_validator(mode="after")
    def _pq_m_divides_the_embedding_width(self) -> Params:
        D = self.train.model.embed_dim
        if self.index.kind == "ivf_pq" and D % self.index.pq_m:
            raise ValueError(f"index.pq_m={self.index.pq_m} must divide the embedding width train.model.embed_dim={D} "
                             "(ivf_pq cuts each element into pq_m sub-vectors)")  # fmt: skip
        return self


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``train.optim.lr: Input should be greater than 0 (got -1)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else ""
        lines.append(f"{loc}: {e['msg']}{got}")
    return "\n".join(lines)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-05`` as a float (YAML 1.2), as ``dvc exp run -S`` writes small floats that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate params.yaml; the only reader of that file.

    Raises:
        ParamsError: missing file, YAML syntax error, or schema violations (one line per dotted key).
    """
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"no params file at {path}; run from the repository root or pass --params")
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(f"invalid {path}:\n{format_validation_error(e)}") from None
