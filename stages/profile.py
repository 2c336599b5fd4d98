"""Named params overlays (``profiles/<name>.yaml``): every compared system, and the paper settings, as a configuration.

A profile is a partial params.yaml deep-merged over params.yaml. Mappings merge key by key, everything else
(scalars, lists) replaces; a mapping that holds ``_replace: true`` replaces the mapping below it instead of
merging into it, so a system with another head does not inherit the SPM's ``head_kwargs``.

Commands::

    python -m stages.profile list                 # names and one-line summaries
    python -m stages.profile show pvse [--merged] # the overlay file, or params.yaml with it merged in
    python -m stages.profile args pvse            # `-S` flags: dvc exp run $(python -m stages.profile args pvse)
    python -m stages.profile apply pvse           # merge it into params.yaml in place, keeping comments

``args`` prints Hydra overrides (the grammar of ``dvc exp run -S``). DVC applies ``key=value`` with OmegaConf's
*merge*, so a whole-mapping value would merge into the existing mapping; each leaf is therefore set on its own with
``++key=value`` (set or add), and a replaced mapping is first reset with ``++key=null`` and then set whole with
``++key={...}``, which works whether or not the key exists in params.yaml. The flags hold no whitespace, so the
unquoted ``$(...)`` form word-splits them correctly. The logic lives in ``pipeline/profiles.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from pipeline.cli import call, set_offline_env, setup_logging
from pipeline.params import load_params
from pipeline.profiles import (
    PROFILES_DIR,
    apply_profile,
    dvc_set_args,
    list_profiles,
    load_profile,
    profile_params,
    profile_path,
    profile_summary,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


@app.command("list")
def list_command(
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of <name>.yaml overlays"),
) -> None:
    """List the profiles with the first line of their description."""
    for name in list_profiles(profiles_dir):
        summary = profile_summary(profiles_dir / f"{name}.yaml")
        typer.echo(f"{name:28s} {summary if len(summary) <= 90 else summary[:89] + '…'}")


@app.command("show")
def show_command(
    name: str = typer.Argument(..., help="profile name (see `list`)"),
    merged: bool = typer.Option(False, "--merged", help="print params.yaml with the profile merged in (validated)"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to merge over"),
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of <name>.yaml overlays"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Print a profile's overlay file, or (--merged) the full params it gives."""
    if merged:
        params = call(profile_params, name, params_path, profiles_dir, debug=debug)
        typer.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, width=120), nl=False)
    else:
        typer.echo(call(profile_path, name, profiles_dir, debug=debug).read_text(), nl=False)


@app.command("args")
def args_command(
    name: str = typer.Argument(..., help="profile name (see `list`)"),
    params_path: Path = typer.Option(
        Path("params.yaml"), "--params", help="params.yaml the flags will be applied to (checked to validate)"
    ),
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of <name>.yaml overlays"),
    json_output: bool = typer.Option(False, "--json", help="print the argument list as JSON instead"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Print the `-S key=value` flags that run a profile as a DVC experiment: dvc exp run $(... args NAME)."""
    call(profile_params, name, params_path, profiles_dir, debug=debug)  # fail here, not inside dvc
    base = call(load_params, params_path, debug=debug).model_dump(mode="json")
    flags = call(dvc_set_args, call(load_profile, name, profiles_dir, debug=debug), base, debug=debug)
    typer.echo(json.dumps(flags) if json_output else " ".join(flags))


@app.command("apply")
def apply_command(
    name: str = typer.Argument(..., help="profile name (see `list`)"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml to edit in place"),
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of <name>.yaml overlays"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Merge a profile into params.yaml in place, keeping comments and the other keys."""
    call(apply_profile, name, params_path, profiles_dir, debug=debug)
    typer.echo(f"applied profile {name} to {params_path}")


@app.callback()
def _setup() -> None:
    """Named params overlays (profiles/*.yaml): list, show, turn into `dvc exp run -S` flags, or apply."""
    set_offline_env()
    setup_logging(quiet=True)


if __name__ == "__main__":
    app()
