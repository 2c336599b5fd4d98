"""pipeline/plots.py: `dvc plots show` / `dvc plots diff` pages of a tiny run draw in headless Chromium with the network
cut off (marks in the SVG, no request), the report gallery loads nothing external either, and the PNG copies of the
same charts are real pictures."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.plots import PNG_SCALE, TEMPLATE, png_names, render_template, write_plot_pngs
from pipeline.report import Hit, Query, render_gallery, write_thumbnail
from tests.browser import open_offline
from tests.stages.test_report import tiny  # noqa: F401 (fixture: a tiny dataset, feature and embedding store)

ROOT = Path(__file__).resolve().parents[2]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
LIVE, PLOTS = PARAMS["paths"]["dvclive"], PARAMS["paths"]["plots"]
STEPS = 6
KS = (1, 5, 10, 50)
SHIFT = 3.0  # the workspace run's values are HEAD's plus this
CURVES = {"train_loss": [2.0 / (1 + s) for s in range(STEPS)], "val_rsum": [40.0 + 15 * s for s in range(STEPS)]}
PLOT_IDS = [f"{LIVE}/plots/metrics/train_loss.tsv", f"{LIVE}/plots/metrics/val_rsum.tsv", f"{PLOTS}/recall_at_k.json"]


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip


def _run(cwd: Path, *cmd: str) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"
    return done.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _recall(direction: str, i: int, shift: float = 0.0) -> float:
    return 10.0 * i + KS[i] + shift + (2.0 if direction == "t2i" else 0.0)


def _write_run(repo: Path, shift: float = 0.0) -> None:
    """What train (dvclive TSVs) and evaluate (recall@K rows) leave in the workspace, at the params.yaml paths."""
    metrics = repo / LIVE / "plots" / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    for name, values in CURVES.items():
        rows = "".join(f"{s}\t{v + shift}\n" for s, v in enumerate(values))
        (metrics / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    rows = [{"k": k, "recall": _recall(d, i, shift), "direction": d} for d in ("i2t", "t2i") for i, k in enumerate(KS)]
    (repo / PLOTS).mkdir(parents=True, exist_ok=True)
    (repo / PLOTS / "recall_at_k.json").write_text(json.dumps(rows, indent=1))


def _project_template() -> Path:
    """The page template `.dvc/config` names (relative to `.dvc/`), as `make setup` built it."""
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    path = ROOT / ".dvc" / config["plots"]["html_template"]
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make setup` builds it (python -m pipeline.plots)")
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repo with the project's dvc.yaml, params.yaml, chart templates and page template, holding a tiny
    committed run (HEAD) and a changed one in the workspace, so `dvc plots diff HEAD` has two revisions."""
    root = tmp_path_factory.mktemp("plots-repo")
    _run(root, "git", "init", "-q")
    _dvc(root, "init", "-q")
    with (root / ".dvc" / "config").open("a") as config:  # what `dvc config plots.html_template ...` writes
        config.write(f"[core]\n    analytics = false\n[plots]\n    html_template = {_project_template()}\n")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    _write_run(root)
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-q", "-m", "tiny run")
    _write_run(root, shift=SHIFT)
    return root


def _charts(dom: str) -> dict[str, str]:
    """Plot div id -> its rendered markup."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r'<div id="([^"]+)" class="vega-embed', dom)]
    ends = [s for s, _ in starts[1:]] + [len(dom)]
    return {plot_id: dom[s:e] for (s, plot_id), e in zip(starts, ends, strict=True)}


def _line_vertices(chart: str, mark: str = "layer_1_marks") -> list[int]:
    """Vertex count of each drawn path of a line mark, one per series: ``layer_1_marks`` is the plain (un-smoothed)
    line of DVC's ``linear`` template, ``layer_0_marks`` the line of ``.dvc/plots/recall_at_k.json``."""
    groups = re.findall(rf'<g class="mark-line role-mark {mark}"[^>]*>(.*?)</g>', chart, re.S)
    assert groups, f"no line mark {mark} drawn"
    return [1 + d.count("L") for group in groups for d in re.findall(r'<path[^>]* d="(M[^"]+)"', group)]


def _div_id(plot_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", plot_id)


# ------------------------------------------------------------------------------------------------ the page template
def test_template_inlines_vega_and_loads_nothing_itself() -> None:
    template = _project_template()
    text = template.read_text(encoding="utf-8")
    assert text == render_template(), f"{template} is stale for the installed vl-convert-python: `make setup`"
    assert text.count("{plot_divs}") == 1 and "{scripts}" not in text  # DVC's CDN <script src> tags have no slot
    markup = re.sub(r"<script>.*?</script>", "<script></script>", text, flags=re.S)  # the page, less the inline JS
    assert markup.count("<script") == 1 and not re.search(r"\b(src|href)=", markup, re.I)
    assert "window.vegaEmbed=" in text and len(text) > 500_000
    assert (ROOT / TEMPLATE) == template


def test_dvc_plots_show_page_draws_every_chart_offline(repo: Path, tmp_path: Path) -> None:
    out = repo / "show"
    assert _dvc(repo, "plots", "show", "-o", str(out)).strip().endswith("index.html")
    page = out / "index.html"
    assert "cdn.jsdelivr" not in page.read_text(encoding="utf-8")
    rendered = open_offline(page, tmp_path)
    assert rendered.requests == []
    charts = _charts(rendered.dom)
    assert set(charts) == {_div_id(p) for p in PLOT_IDS}
    for plot_id in PLOT_IDS:
        chart = charts[_div_id(plot_id)]
        assert re.search(r'<svg[^>]* class="marks"', chart)
        if plot_id.endswith("recall_at_k.json"):
            assert _line_vertices(chart, "layer_0_marks") == [len(KS), len(KS)]  # one line per direction
            assert "X-axis titled 'K' for a log scale" in chart and "Y-axis titled 'recall@K (%)'" in chart
            for d in ("i2t", "t2i"):
                for i, k in enumerate(KS):  # every point drawn, with its value (the symbols' accessible labels)
                    label = f"K: {k}; recall@K (%): {_recall(d, i, SHIFT):g}; direction: {d}; rev: workspace"
                    assert f'aria-label="{label}"' in chart
        else:
            assert _line_vertices(chart) == [STEPS], plot_id  # one revision: one line through every step
            assert "X-axis titled 'step'" in chart and f"Y-axis titled '{Path(plot_id).stem}'" in chart


def test_dvc_plots_diff_page_draws_both_revisions_offline(repo: Path, tmp_path: Path) -> None:
    out = repo / "diff"
    _dvc(repo, "plots", "diff", "HEAD", "-o", str(out))
    rendered = open_offline(out / "index.html", tmp_path)
    assert rendered.requests == []
    charts = _charts(rendered.dom)
    loss, recall = charts[_div_id(PLOT_IDS[0])], charts[_div_id(PLOT_IDS[2])]
    assert _line_vertices(loss) == [STEPS, STEPS]  # HEAD and the workspace
    assert re.search(r"legend titled 'rev' [^\"]* 2 values: (HEAD, workspace|workspace, HEAD)", loss)
    assert _line_vertices(recall, "layer_0_marks") == [len(KS)] * 4  # 2 directions x 2 revisions


def test_the_offline_check_catches_dvc_default_cdn_page(tmp_path: Path) -> None:
    """Positive control: DVC's own page (CDN scripts) is caught by the same check and draws nothing offline."""
    from dvc_render import VegaRenderer, render_html

    data = [{"step": s, "train_loss": v, "rev": "workspace"} for s, v in enumerate(CURVES["train_loss"])]
    page = render_html([VegaRenderer(data, "loss", x="step", y="train_loss")], tmp_path / "cdn" / "index.html")
    rendered = open_offline(Path(page), tmp_path)
    assert any("cdn.jsdelivr.net/npm/vega" in url for url in rendered.requests), rendered.requests
    assert not re.search(r'<svg[^>]* class="marks"', rendered.dom)


def test_report_gallery_loads_nothing_external(tmp_path: Path) -> None:
    picture = tmp_path / "source.png"
    Image.fromarray(np.full((32, 48, 3), 200, dtype=np.uint8)).save(picture)
    out = tmp_path / "reports"
    thumb = write_thumbnail(picture, out / "images", "img0", 64)
    hits = [Hit(1, 0.9, "original", "image 0", thumb), Hit(2, 0.5, "other", "image 1", thumb)]
    gallery = render_gallery(out / "gallery.html", meta="tiny", text_queries=[Query("\u201ca cat\u201d", "", hits)],
                             image_queries=[], figures=[], has_relevance=False)  # fmt: skip
    rendered = open_offline(Path(gallery), tmp_path)
    assert rendered.requests == []
    assert 'data-images-loaded="2"' in rendered.dom  # its own images did load


# ------------------------------------------------------------------------------------------------ PNGs
def test_plot_pngs_are_the_charts_of_the_page(repo: Path, tmp_path: Path) -> None:
    written = write_plot_pngs(tmp_path / "plots", repo=repo)
    assert [p.name for p in written] == sorted(["recall_at_k.png", "train_loss.png", "val_rsum.png"])
    for path in written:
        with Image.open(path) as im:
            assert im.format == "PNG"
            assert im.width >= 300 * PNG_SCALE and im.height >= 300 * PNG_SCALE  # DVC's 300 x 300 plot area, 2x
            pixels = np.asarray(im.convert("RGB")).astype(np.int16)
        line = (pixels.max(axis=-1) - pixels.min(axis=-1) > 80).mean()  # saturated: the series (axes are grey)
        dark = (pixels.max(axis=-1) < 90).mean()
        assert line > 0.002, f"{path.name}: no line drawn"
        assert dark > 0.002, f"{path.name}: no axis text"
    assert sorted((tmp_path / "plots").iterdir()) == written  # nothing else (the staging folder is gone)


def test_report_stage_writes_the_pngs_beside_the_gallery(tiny: dict[str, Path], repo: Path, tmp_path: Path) -> None:  # noqa: F811
    from typer.testing import CliRunner

    from pipeline.plots import PLOTS_DIR
    from stages.report import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0}))
    out = tmp_path / "reports"
    shapes = tiny["shapes"]
    args = ["--params", str(params), "--embeddings", str(tiny["embeddings"]), "--dataset-json",
            str(shapes / "dataset.json"), "--image-root", str(shapes / "images"), "--out", str(out),
            "--plots-repo", str(repo), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "gallery.html").is_file()
    assert sorted(p.name for p in (out / PLOTS_DIR).iterdir()) == ["recall_at_k.png", "train_loss.png", "val_rsum.png"]
    assert f"3 charts of `dvc plots show` in {out / PLOTS_DIR}" in result.output


def test_plot_pngs_fail_readably_without_plot_data(tmp_path: Path) -> None:
    _run(tmp_path, "git", "init", "-q")
    _dvc(tmp_path, "init", "-q")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        write_plot_pngs(tmp_path / "plots", repo=tmp_path)
    assert not (tmp_path / "plots").exists()


def test_png_names_use_the_stem_unless_stems_collide() -> None:
    assert png_names(["a/x.tsv", "b/y.json"]) == {"a/x.tsv": "x.png", "b/y.json": "y.png"}
    assert png_names(["a/x.tsv", "b/x.tsv"]) == {"a/x.tsv": "a__x.png", "b/x.tsv": "b__x.png"}
