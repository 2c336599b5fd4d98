"""Plots that draw offline: the page template of ``dvc plots show`` / ``dvc plots diff``, and PNG copies of its charts.

DVC fills an HTML template: ``{plot_divs}`` becomes one ``<div>`` per chart (a vega-lite spec and a ``vegaEmbed`` call)
and ``{scripts}`` becomes ``<script src>`` tags that load vega, vega-lite and vega-embed from a public CDN (the
``SCRIPTS`` of ``dvc_render.VegaRenderer``), so offline the default page is blank. The template built here has no
``{scripts}`` placeholder: it inlines the vega + vega-lite + vega-embed bundle that ``vl-convert-python`` ships
(``vl_convert.javascript_bundle``, the route Altair takes for ``chart.save(..., inline=True)``), so the page opens with
nothing to fetch. The JavaScript arrives with the pinned wheel at set-up (``make setup`` builds the template from it);
``.dvc/config`` points ``plots.html_template`` at the result (``TEMPLATE``, relative to ``.dvc/``).

The same library renders PNGs: ``write_plot_pngs`` asks DVC for the filled spec of every vega plot that
``dvc plots show`` draws for the workspace (``dvc_render``'s templates, dvc.yaml's plot properties) and converts each
one with ``vl_convert.vegalite_to_png``: one file per chart, for readers in a terminal.

    python -m pipeline.plots [--out .dvc/offline_plots.html]   # (re)build the template (``make setup`` runs it)
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The template, relative to the repository root; `.dvc/config` names it relative to `.dvc/` ("offline_plots.html").
TEMPLATE = Path(".dvc") / "offline_plots.html"
# DVC's vega templates are vega-lite v5 specs ("$schema": .../vega-lite/v5.json): bundle and render with the newest
# v5 that vl-convert carries, for the page and the PNGs alike.
VEGALITE_VERSION = "5.21"
PLOTS_DIR = "plots"  # the report stage writes the PNGs to <reports>/plots/
PNG_SCALE = 2.0  # DVC's charts are 300 x 300 css px: 2x gives a sharp ~800 px wide file
_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what dvc_render.HTML.embed replaces

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC Plot</title>
<!-- setemb offline plots template (pipeline/plots.py; rebuild: python -m pipeline.plots). Inlined below, so that
     nothing is fetched when the page opens: vega @VEGA@, vega-lite @VEGALITE@, vega-embed @EMBED@ (BSD-3-Clause,
     with their bundled dependencies), from vl-convert-python @VLCONVERT@. -->
<script>
(function () {
@BUNDLE@
})();
</script>
<style>
    table {
        border-spacing: 15px;
    }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def versions() -> dict[str, str]:
    """Versions of what the template inlines: ``{"vega", "vega-lite", "vega-embed", "vl-convert-python"}``."""
    from importlib.metadata import version

    import vl_convert

    carried = vl_convert.get_vegalite_versions()
    if VEGALITE_VERSION not in carried:
        raise RuntimeError(f"vl-convert-python carries vega-lite {carried}, not {VEGALITE_VERSION}")
    return {
        "vega": vl_convert.get_vega_version(),
        "vega-lite": VEGALITE_VERSION,
        "vega-embed": vl_convert.get_vega_embed_version(),
        "vl-convert-python": version("vl-convert-python"),
    }


def render_template() -> str:
    """The page template, with the vega libraries inlined (about 0.9 MB).

    The bundle runs inside a function scope (its minified top-level names cannot clash with DVC's ``var spec``) and
    sets ``window.vega``, ``window.vegaLite`` and ``window.vegaEmbed``; vega-embed renders SVG by default.
    """
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGALITE_VERSION)
    for placeholder in _PLACEHOLDERS:
        if placeholder in bundle:  # DVC would substitute inside the JavaScript
            raise RuntimeError(f"the vega bundle contains DVC's placeholder {placeholder}; cannot build the template")
    bundle = re.sub(r"</(script)", r"<\\/\1", bundle, flags=re.IGNORECASE)  # same JS, cannot close the <script>
    v = versions()
    page = (
        _PAGE.replace("@VEGA@", v["vega"])
        .replace("@VEGALITE@", v["vega-lite"])
        .replace("@EMBED@", v["vega-embed"])
        .replace("@VLCONVERT@", v["vl-convert-python"])
        .replace("@BUNDLE@", bundle)
    )
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page  # internal invariant of _PAGE
    return page


def write_template(path: str | os.PathLike = TEMPLATE) -> Path:
    """Write ``render_template()`` to ``path`` atomically (temp file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render_template())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------ PNGs
def plot_specs(repo: str | os.PathLike = ".", targets: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The vega-lite spec of every vega chart ``dvc plots show`` draws for the workspace of ``repo``, by plot id.

    Uses DVC's own collection and ``dvc_render`` templates (``Repo.plots.show`` + ``match_defs_renderers``, what the
    command runs), so a PNG is the chart of the page. Read-only: takes no DVC lock, so it runs inside a stage.

    Raises:
        FileNotFoundError: a plot source that dvc.yaml declares is missing or unreadable (names the file).
    """
    from dvc.render.match import match_defs_renderers
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc_repo:
        data = dvc_repo.plots.show(targets=list(targets) if targets else None)
        renderers = match_defs_renderers(data, templates_dir=dvc_repo.plots.templates_dir)
    specs: dict[str, dict[str, Any]] = {}
    for found in renderers:
        for rev, errors in found.source_errors.items():
            for source, error in errors.items():
                raise FileNotFoundError(f"plot source {source} ({rev}) could not be read: {error}; run `dvc repro`")
        for rev, error in found.definition_errors.items():
            raise ValueError(f"plot {found.renderer.name} ({rev}): {error}")
        if found.renderer.TYPE != "vega":
            continue
        spec = found.renderer.get_filled_template()
        if spec:
            specs[found.renderer.name] = spec
    return specs


def png_names(plot_ids: Sequence[str]) -> dict[str, str]:
    """A file name per plot id: the source's stem (``train_loss.png``), its parents joined in when stems collide."""
    stems = [Path(p).with_suffix("").name for p in plot_ids]
    names = {}
    for plot_id, stem in zip(plot_ids, stems, strict=True):
        name = stem if stems.count(stem) == 1 else Path(plot_id).with_suffix("").as_posix().replace("/", "__")
        names[plot_id] = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"
    return names


def write_plot_pngs(out: str | os.PathLike, *, repo: str | os.PathLike = ".", scale: float = PNG_SCALE) -> list[Path]:
    """Render every chart of ``dvc plots show`` (``plot_specs``) to ``<out>/<name>.png``; ``out`` is replaced whole.

    Returns:
        The written files, sorted by name.
    """
    import vl_convert

    from pipeline.files import replace_dir

    out = Path(out)
    specs = plot_specs(repo)
    if not specs:
        raise FileNotFoundError(f"dvc.yaml in {Path(repo).resolve()} defines no vega plot with data; run `dvc repro`")
    names = png_names(list(specs))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for plot_id, spec in specs.items():
            png = vl_convert.vegalite_to_png(spec, vl_version=VEGALITE_VERSION, scale=scale)
            (staging / names[plot_id]).write_bytes(png)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = sorted(out / name for name in names.values())
    logger.info("wrote %d charts of `dvc plots show` as PNGs to %s", len(written), out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TEMPLATE, help=f"template to write (default {TEMPLATE})")
    args = parser.parse_args(argv)
    path = write_template(args.out)
    v = versions()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): vega {v['vega']}, vega-lite {v['vega-lite']}, "
          f"vega-embed {v['vega-embed']} from vl-convert-python {v['vl-convert-python']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
