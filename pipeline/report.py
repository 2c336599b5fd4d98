"""Human-readable reports of an embedding store: attention-map figures (DivE Figure 4) and a static HTML gallery.

Attention figures: one PNG per image, the image then one panel per set element k with that element's attention
``[h, w]`` over the backbone's conv grid, upsampled bilinearly to the part of the image the backbone saw and alpha
blended over it with a colormap (each panel normalised by its own maximum; the part outside the centre crop is
dimmed). The grid maps back through the backbone preprocessing (``pipeline.image_backbones``, `backbone_crop_box`):
with ``image_transform: resize`` it covers the whole image; with ``center_crop`` the short side was resized to
``round(input / 0.875)`` (256 for 224 px) and the centre ``input`` square kept; the grid is row-major
(``fmap.flatten(2)``), so token ``t`` is cell ``(t // w, t % w)``. Each panel is titled with the caption nearest to
its element (`nearest_captions`): the caption ``c`` maximising ``max_l cos(v_k, t_{c,l})`` over every caption of the
split, i.e. the element's best match among all caption set elements, reported as the caption it belongs to.

Gallery: ``gallery.html``, self-contained and offline (inline CSS, no external resources; thumbnails copied into
``images/`` and referenced by relative path). Text -> image and image -> text top-k lists, one ``.tile`` element per
result: class ``original`` for the ground-truth pair (the caption's own image / the image's own captions),
``relevant`` for other items the exhaustive relevance file marks relevant, ``other`` otherwise. A small inline script
sets ``data-images-loaded`` / ``data-images-total`` on ``<body>`` at window load (headless-browser tests read them).
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CROP_PCT = 0.875  # center_crop: the short side is resized to round(input / 0.875), then centre crop `input`
DIM_OUTSIDE_CROP = 0.35  # brightness kept outside the crop the backbone saw
FLOOR_WEIGHT = 0.3  # colormap weight at zero attention, as a fraction of alpha (so the image stays readable)
FIGURE_DPI = 100
TITLE_PX = 76  # title band above the panels (element line + 3 caption lines at 9 pt)
TITLE_CHARS = 38  # caption wrap width at 9 pt in a 256 px panel
TITLE_LINES = 3


# ------------------------------------------------------------------------------------------------ geometry / math
def spread(n_total: int, n: int) -> list[int]:
    """``min(n, n_total)`` distinct indices evenly spread over ``range(n_total)`` (deterministic query picks)."""
    n = min(n, n_total)
    if n <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n_total - 1, n).round()})


def backbone_crop_box(
    width: int, height: int, input_size: int = 224, transform: str = "center_crop"
) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in original pixels of what the backbone saw (``pipeline.image_backbones``): the whole
    image for ``transform="resize"``; for ``center_crop`` torchvision ``Resize(round(input / 0.875))`` of the short
    side, then ``CenterCrop(input)``. (The default is the transform of stores that do not record one.)"""
    if transform == "resize":
        return 0.0, 0.0, float(width), float(height)
    if transform != "center_crop":
        raise ValueError(f"transform must be resize or center_crop, got {transform!r}")
    resize = round(input_size / CROP_PCT)
    if width <= height:
        rw, rh = resize, int(resize * height / width)
    else:
        rw, rh = int(resize * width / height), resize
    left, top = int(round((rw - input_size) / 2.0)), int(round((rh - input_size) / 2.0))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + input_size) * sx, (top + input_size) * sy


def attention_grid(attention: Tensor, grid: Sequence[int]) -> Tensor:
    """Reshape one item's attention over flattened conv cells into maps.

    Args:
        attention: ``[K, Ntok]`` weights of each set element over its inputs (``Ntok >= h * w``; padding beyond).
        grid: ``(h, w)`` of the backbone's feature map (row-major flattening).

    Returns:
        ``[K, h, w]`` float32.
    """
    if attention.ndim != 2:
        raise ValueError(f"attention must be [K, Ntok], got {tuple(attention.shape)}")
    K, N = attention.shape
    h, w = int(grid[0]), int(grid[1])
    if N < h * w:
        raise ValueError(f"attention over {N} inputs cannot cover a {h}x{w} grid (expected Ntok >= {h * w})")
    return attention[:, : h * w].float().reshape(K, h, w)  # [K, h, w]


def nearest_captions(elements: Tensor, captions: Tensor, block_size: int = 4096) -> tuple[Tensor, Tensor]:
    """The caption nearest to each image set element: ``argmax_c max_l cos(v_{b,k}, t_{c,l})``.

    Args:
        elements: ``[B, K, D]`` image sets.
        captions: ``[C, L, D]`` caption sets (all captions of the split).
        block_size: captions scored at a time.

    Returns:
        ``(cosine [B, K], caption [B, K] int64)``; ties go to the lower caption index.
    """
    if elements.ndim != 3 or captions.ndim != 3 or elements.shape[2] != captions.shape[2] or len(captions) == 0:
        raise ValueError(
            f"expected elements [B, K, D] and non-empty captions [C, L, D], got {tuple(elements.shape)} and "
            f"{tuple(captions.shape)}"
        )
    B, K, D = elements.shape
    v = torch.nn.functional.normalize(elements.float(), dim=-1)  # [B, K, D]
    best = torch.full((B, K), -torch.inf, device=v.device)
    index = torch.zeros(B, K, dtype=torch.long, device=v.device)
    for c0 in range(0, len(captions), block_size):
        t = torch.nn.functional.normalize(captions[c0 : c0 + block_size].float().to(v.device), dim=-1)  # [c, L, D]
        cos = torch.einsum("bkd,cld->bkcl", v, t).amax(dim=-1)  # [B, K, c]
        value, arg = cos.max(dim=-1)  # [B, K]
        better = value > best
        best, index = torch.where(better, value, best), torch.where(better, arg + c0, index)
    return best, index


def overlay_attention(
    image: np.ndarray, heat: np.ndarray, box: Sequence[float], colormap: str = "jet", alpha: float = 0.6
) -> np.ndarray:
    """Blend one attention map over an image.

    Args:
        image: ``[H, W, 3]`` uint8.
        heat: ``[h, w]`` attention over the grid cells of ``box``; normalised by its maximum here.
        box: ``(x0, y0, x1, y1)`` pixels of ``image`` the grid covers (`backbone_crop_box`).
        colormap: matplotlib colormap name.
        alpha: colormap weight at the peak; it falls linearly to ``alpha * FLOOR_WEIGHT`` at zero attention, so the
            image stays readable where the element does not look. Outside ``box`` the image is dimmed to
            ``DIM_OUTSIDE_CROP``.

    Returns:
        ``[H, W, 3]`` uint8.
    """
    import matplotlib

    H, W, _ = image.shape
    heat = np.asarray(heat, dtype=np.float32)
    peak = float(heat.max(initial=0.0))
    heat = heat / peak if peak > 0 else np.zeros_like(heat)  # [h, w] in [0, 1]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    up = Image.fromarray(heat).resize((max(x1 - x0, 1), max(y1 - y0, 1)), Image.Resampling.BILINEAR)
    up = np.clip(np.asarray(up), 0.0, 1.0)[..., None]  # [h', w', 1]
    colours = matplotlib.colormaps[colormap](up[..., 0])[..., :3] * 255.0  # [h', w', 3]
    weight = alpha * (FLOOR_WEIGHT + (1.0 - FLOOR_WEIGHT) * up)  # [h', w', 1]: alpha * FLOOR_WEIGHT .. alpha
    out = image.astype(np.float32) * DIM_OUTSIDE_CROP
    inside = image[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = (1.0 - weight) * inside + weight * colours
    return np.clip(out.round(), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ attention figures
def figure_size(num_elements: int, panel_px: int = 256) -> tuple[int, int]:
    """``(width, height)`` in pixels of an attention figure: the image plus ``num_elements`` panels."""
    return (num_elements + 1) * panel_px, panel_px + TITLE_PX


def panel_boxes(num_elements: int, panel_px: int = 256) -> list[tuple[int, int, int, int]]:
    """Pixel boxes ``(left, top, right, bottom)`` of the square panels (image first), top-left origin."""
    margin = max(4, panel_px // 32)
    side = panel_px - 2 * margin
    return [(i * panel_px + margin, TITLE_PX, i * panel_px + margin + side, TITLE_PX + side)
            for i in range(num_elements + 1)]  # fmt: skip


def panel_title(caption: str, head: str) -> str:
    """``head`` then the quoted caption wrapped to ``TITLE_LINES`` lines (ellipsis when longer)."""
    lines = textwrap.wrap(f"\u201c{caption}\u201d", TITLE_CHARS) or [""]
    if len(lines) > TITLE_LINES:
        lines = lines[:TITLE_LINES]
        lines[-1] = lines[-1][: TITLE_CHARS - 1].rstrip() + "\u2026"
    return "\n".join([head, *lines])


def _fit(image: Image.Image, side: int) -> Image.Image:
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def render_attention_figure(
    image: Image.Image,
    maps: Tensor,
    *,
    input_size: int,
    titles: Sequence[str],
    image_title: str,
    path: str | Path,
    panel_px: int = 256,
    colormap: str = "jet",
    alpha: float = 0.6,
    transform: str = "center_crop",
) -> Path:
    """Write one DivE-Figure-4 row: the image, then each element's attention overlaid (PNG, `figure_size` pixels).

    Args:
        image: the original image.
        maps: ``[K, h, w]`` attention of the K set elements over the conv grid (`attention_grid`).
        input_size: backbone input side (feature store attr ``image_size``; 224).
        transform: the backbone's test-time transform (feature store attr ``image_transform``; `backbone_crop_box`).
        titles: K element panel titles, image_title: the image panel's title; each a bold first line and the
            lines below it (`panel_title`).
        path: PNG to write.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if maps.ndim != 3 or len(titles) != maps.shape[0]:
        raise ValueError(f"expected maps [K, h, w] and K titles, got {tuple(maps.shape)} and {len(titles)} titles")
    K, h, w = maps.shape
    width, height = figure_size(K, panel_px)
    boxes = panel_boxes(K, panel_px)
    fig = Figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI, facecolor="white")
    shown = _fit(image.convert("RGB"), boxes[0][2] - boxes[0][0])
    scale = shown.width / image.width
    box = [v * scale for v in backbone_crop_box(image.width, image.height, input_size, transform)]
    pixels = np.asarray(shown)  # [H', W', 3] uint8
    for i, (left, top, right, bottom) in enumerate(boxes):
        ax = fig.add_axes((left / width, 1 - bottom / height, (right - left) / width, (bottom - top) / height))
        ax.set_axis_off()
        if i == 0:
            ax.imshow(pixels, interpolation="antialiased")
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.2, ls="--"))
            head, _, body = image_title.partition("\n")
        else:
            ax.imshow(overlay_attention(pixels, maps[i - 1].cpu().numpy(), box, colormap, alpha))
            head, _, body = titles[i - 1].partition("\n")
        x = left / width
        fig.text(x, 1 - 4 / height, head, va="top", ha="left", fontsize=9.5, fontweight="bold", color="#1d2330")
        fig.text(x, 1 - 20 / height, body, va="top", ha="left", fontsize=9, color="#1d2330", linespacing=1.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, format="png")
    return path


# ------------------------------------------------------------------------------------------------ gallery
@dataclass
class Hit:
    """One gallery result. kind: ``original`` (ground-truth pair), ``relevant`` or ``other``."""

    rank: int
    score: float
    kind: str
    label: str  # caption text (image -> text) or image id (text -> image)
    image: str | None = None  # relative thumbnail path (text -> image)


@dataclass
class Query:
    title: str
    subtitle: str
    hits: list[Hit]
    image: str | None = None  # relative thumbnail of an image query
    relevant_total: int | None = None  # relevant items in the whole gallery (None without relevance)


def safe_name(item_id: str) -> str:
    """A filename-safe form of a dataset id."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", item_id)[:80] or "item"


def write_thumbnail(source: str | Path, out_dir: Path, name: str, side: int) -> str:
    """Copy ``source`` as a JPEG of longest side ``<= side`` to ``out_dir/<name>.jpg``; returns the relative path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{safe_name(name)}.jpg"
    if not target.exists():
        with Image.open(source) as im:
            im = im.convert("RGB")
            if max(im.size) > side:
                im = _fit(im, side)
            im.save(target, "JPEG", quality=90)
    return f"{out_dir.name}/{target.name}"


_KIND_BADGE = {"original": "original pair", "relevant": "relevant", "other": ""}

CSS = """
:root { --gold: #d4a017; --green: #2e9e4f; --ink: #1d2330; --muted: #687083; --card: #ffffff; --bg: #f3f4f7; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; background: var(--bg); color: var(--ink);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }
header { margin-bottom: 18px; } h1 { margin: 0 0 4px; font-size: 26px; }
.meta { color: var(--muted); margin: 0 0 10px; }
.legend { display: flex; gap: 18px; flex-wrap: wrap; font-size: 14px; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; vertical-align: -2px;
          margin-right: 6px; border: 3px solid #c9ccd4; background: #fff; }
.swatch.original { border-color: var(--gold); } .swatch.relevant { border-color: var(--green); }
h2 { margin: 28px 0 12px; font-size: 20px; border-bottom: 2px solid #dde0e7; padding-bottom: 4px; }
.query { background: var(--card); border-radius: 10px; padding: 14px 16px; margin-bottom: 16px;
         box-shadow: 0 1px 3px rgba(20, 30, 50, .08); }
.query-head { display: flex; gap: 14px; align-items: center; margin-bottom: 10px; }
.query-head h3 { margin: 0; font-size: 16px; font-weight: 600; }
.query-head .sub { color: var(--muted); font-size: 13px; }
.query-image { width: 96px; height: 96px; object-fit: cover; border-radius: 6px; }
.results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.tile { margin: 0; background: #fafbfc; border: 4px solid #d9dce3; border-radius: 8px; padding: 6px;
        display: flex; flex-direction: column; gap: 6px; }
.tile.original { border-color: var(--gold); background: #fff9e8; }
.tile.relevant { border-color: var(--green); background: #eef9f1; }
.tile img { width: 100%; aspect-ratio: 1 / 1; object-fit: cover; border-radius: 4px; display: block; }
.tile .caption { margin: 0; font-size: 14px; flex: 1; }
.tile footer, .tile figcaption { display: flex; justify-content: space-between; align-items: center;
        font-size: 12px; color: var(--muted); font-variant-numeric: tabular-nums; gap: 6px; }
.rank { font-weight: 700; color: var(--ink); }
.badge { border-radius: 999px; padding: 0 7px; color: #fff; font-size: 11px; }
.original .badge { background: var(--gold); } .relevant .badge { background: var(--green); }
.attention img { max-width: 100%; background: #fff; border-radius: 8px; box-shadow: 0 1px 3px rgba(20, 30, 50, .08); }
.attention { margin: 0 0 14px; } .note { color: var(--muted); font-size: 13px; }
img.broken { outline: 3px solid #c62828; }
"""

LOAD_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), ok = 0;
  imgs.forEach(function (im) {
    if (im.complete && im.naturalWidth > 0) { ok += 1; } else { im.classList.add("broken"); }
  });
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images-total", String(imgs.length));
});
"""


def _tile(hit: Hit) -> str:
    badge = f'<span class="badge">{_KIND_BADGE[hit.kind]}</span>' if _KIND_BADGE[hit.kind] else ""
    foot = f'<span class="rank">#{hit.rank}</span>{badge}<span class="score">{hit.score:.4f}</span>'
    label = html.escape(hit.label)
    if hit.image is not None:
        return (f'<figure class="tile {hit.kind}" data-rank="{hit.rank}" data-kind="{hit.kind}">'
                f'<img src="{html.escape(hit.image)}" alt="image {label}" loading="eager"><figcaption>{foot}'
                "</figcaption></figure>")  # fmt: skip
    return (f'<div class="tile {hit.kind}" data-rank="{hit.rank}" data-kind="{hit.kind}">'
            f'<p class="caption">{label}</p><footer>{foot}</footer></div>')  # fmt: skip


def _query(q: Query, direction: str) -> str:
    image = f'<img class="query-image" src="{html.escape(q.image)}" alt="query image">' if q.image else ""
    found = sum(h.kind != "other" for h in q.hits)
    recall = f"{found}/{len(q.hits)} relevant in top {len(q.hits)}"
    if q.relevant_total is not None:
        recall += f" ({q.relevant_total} relevant in all)"
    recall = f"{q.subtitle} \u00b7 {recall}" if q.subtitle else recall
    return (f'<article class="query" data-direction="{direction}"><div class="query-head">{image}<div>'
            f"<h3>{html.escape(q.title)}</h3><div class=\"sub\">{html.escape(recall)}</div></div></div>"
            f'<div class="results">{"".join(_tile(h) for h in q.hits)}</div></article>')  # fmt: skip


def render_gallery(
    path: str | Path,
    *,
    meta: str,
    text_queries: Sequence[Query],
    image_queries: Sequence[Query],
    figures: Sequence[str] = (),
    has_relevance: bool = False,
) -> Path:
    """Write the static gallery page (inline CSS and script only; image paths relative to ``path``'s folder)."""
    legend = ['<span><span class="swatch original"></span>original pair (ground truth)</span>']
    if has_relevance:
        legend.append('<span><span class="swatch relevant"></span>relevant (exhaustive relevance file)</span>')
    legend.append('<span><span class="swatch"></span>not relevant</span>')
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>setemb retrieval report</title><style>{CSS}</style></head><body>",
        f'<header><h1>Retrieval gallery</h1><p class="meta">{html.escape(meta)}</p>',
        f'<div class="legend">{"".join(legend)}</div></header>',
        '<section id="text-to-image"><h2>Text \u2192 image</h2>',
        *(_query(q, "t2i") for q in text_queries),
        '</section><section id="image-to-text"><h2>Image \u2192 text</h2>',
        *(_query(q, "i2t") for q in image_queries),
        "</section>",
    ]
    if figures:
        parts.append(
            '<section id="attention"><h2>Attention maps</h2><p class="note">Each panel: one image set element\'s '
            "attention over the backbone grid, titled with the caption whose set holds the element's nearest "
            "caption element (cosine).</p>"
        )
        parts += [f'<figure class="attention"><img src="{html.escape(f)}" alt="attention maps"></figure>'
                  for f in figures]  # fmt: skip
        parts.append("</section>")
    parts.append(f"<script>{LOAD_SCRIPT}</script></body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
