"""Named params overlays (``profiles/<name>.yaml``): listing, loading, merging, validation, DVC overrides, apply.

A profile is a partial params.yaml deep-merged over params.yaml. Mappings merge key by key, everything else
(scalars, lists) replaces; a mapping that holds ``_replace: true`` replaces the mapping below it instead of
merging into it, so a system with another head does not inherit the SPM's ``head_kwargs``.

``dvc_set_args`` gives Hydra overrides (the grammar of ``dvc exp run -S``). DVC applies ``key=value`` with OmegaConf's
*merge*, so a whole-mapping value would merge into the existing mapping; each leaf is therefore set on its own with
``++key=value`` (set or add), and a replaced mapping is first reset with ``++key=null`` and then set whole with
``++key={...}``, which works whether or not the key exists in params.yaml. The flags hold no whitespace, so the
unquoted ``$(...)`` form word-splits them correctly. ``apply_profile`` merges a profile into params.yaml in place,
keeping its comments. The CLI is ``stages/profile.py``.
"""

from __future__ import annotations

import copy
import io
import math
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import Params, ParamsError, format_validation_error, load_params

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"
REPLACE_KEY = "_replace"
SYSTEM_PROFILES = ("dive", "pvse", "pcme", "maxmatch", "vsepp", "pcmepp")
# YAML 1.1 (PyYAML, which load_params uses) reads 1e-5 as a string; only 1.0e-5 is a float.
_EXPONENT_STRING = re.compile(r"^[-+]?(\d+|\d*\.\d+|\d+\.\d*)[eE][-+]?\d+$")
_BARE_STRING = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")
_HYDRA_RESERVED = {"null", "true", "false", "inf", "nan"}


# ------------------------------------------------------------------------------------------------------ overlays
def list_profiles(directory: str | Path = PROFILES_DIR) -> list[str]:
    """Names of the profiles in ``directory`` (``<name>.yaml``), sorted."""
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def profile_path(name: str, directory: str | Path = PROFILES_DIR) -> Path:
    """``<directory>/<name>.yaml``.

    Raises:
        ParamsError: no such profile (the message lists the known ones).
    """
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"no profile {name!r} in {directory}; known: {', '.join(list_profiles(directory)) or '-'}")
    return path


def _check_overlay(node: Any, where: str) -> None:
    """Markers only inside mappings below the top level, set to true; no exponent floats read as strings."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == REPLACE_KEY:
                if not where or value is not True:
                    raise ParamsError(f"{where or '<root>'}.{REPLACE_KEY} must be true inside a nested mapping")
                continue
            _check_overlay(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_overlay(value, f"{where}[{i}]")
    elif isinstance(node, str) and _EXPONENT_STRING.match(node):
        raise ParamsError(f"{where}: {node!r} is a string in YAML 1.1; write it with a dot (e.g. 1.0e-5)")


def load_profile(name: str, directory: str | Path = PROFILES_DIR) -> dict[str, Any]:
    """The raw overlay of profile ``name`` (``_replace`` markers kept); an empty file is ``{}``.

    Raises:
        ParamsError: unknown profile, invalid YAML, a non-mapping, a misplaced marker or an exponent string.
    """
    path = profile_path(name, directory)
    try:
        overlay = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(overlay, dict):
        raise ParamsError(f"{path} must hold a mapping at the top level, got {type(overlay).__name__}")
    _check_overlay(overlay, "")
    return overlay


def strip_markers(node: Any) -> Any:
    """A deep copy of ``node`` without ``_replace`` keys."""
    if isinstance(node, dict):
        return {k: strip_markers(v) for k, v in node.items() if k != REPLACE_KEY}
    if isinstance(node, list):
        return [strip_markers(v) for v in node]
    return copy.deepcopy(node)


def _replaces(value: Any, base_value: Any) -> bool:
    return isinstance(value, dict) and (value.get(REPLACE_KEY) is True or not isinstance(base_value, dict))


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` deep-merged in (pure; neither argument is modified).

    Mappings merge recursively; a mapping with ``_replace: true`` (or one whose base value is not a mapping)
    replaces the base value; scalars and lists replace.
    """
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if key == REPLACE_KEY:
            continue
        if isinstance(value, dict) and not _replaces(value, out.get(key)):
            out[key] = merge_overlay(out[key], value)
        else:
            out[key] = strip_markers(value)
    return out


def validate_merged(data: dict[str, Any], what: str) -> Params:
    """``Params`` of a merged dict.

    Raises:
        ParamsError: one line per dotted key.
    """
    from pydantic import ValidationError

    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(f"{what} is invalid:\n{format_validation_error(e)}") from None


def profile_params(name: str, params_path: str | Path = "params.yaml", directory: str | Path = PROFILES_DIR) -> Params:
    """``params_path`` (validated by ``load_params``) with profile ``name`` merged in, validated again."""
    base = load_params(params_path).model_dump(mode="json")
    return validate_merged(merge_overlay(base, load_profile(name, directory)), f"profile {name!r} over {params_path}")


# ------------------------------------------------------------------------------------------------ hydra overrides
def hydra_value(value: Any) -> str:
    """``value`` in the Hydra override grammar (what ``dvc exp run -S key=VALUE`` parses), without whitespace.

    Raises:
        ValueError: a string holding whitespace (the unquoted ``$(...)`` form would split it) or an unsupported type.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if any(c.isspace() for c in value):
            raise ValueError(f"string {value!r} holds whitespace; pass it to dvc exp run -S by hand, quoted")
        if "${" in value:
            raise ValueError(f"string {value!r} would be read as an OmegaConf interpolation by dvc exp run -S")
        if _BARE_STRING.match(value) and value.lower() not in _HYDRA_RESERVED:
            return value
        # Hydra quoted strings: a backslash run is literal unless it precedes a quote (own or closing), where it
        # is doubled; the quote itself is escaped.
        quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted) + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {type(value).__name__} {value!r} as a Hydra override")


def hydra_overrides(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """The Hydra overrides (without ``-S``) that turn params.yaml into ``merge_overlay(params.yaml, overlay)``.

    Leaves: ``++key=value``. Replaced mappings (``_replace: true``): ``++key=null`` then ``++key={...}``, which
    replaces the mapping whether or not params.yaml has it. A non-replaced mapping whose key params.yaml lacks, or
    holds a non-mapping value, is merged leaf by leaf into a new mapping, the same as ``merge_overlay``.
    """
    flags: list[str] = []
    for key, value in overlay.items():
        if key == REPLACE_KEY:
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value.get(REPLACE_KEY) is True:
            flags += [f"++{path}=null", f"++{path}={hydra_value(strip_markers(value))}"]
        elif isinstance(value, dict) and value:
            flags += hydra_overrides(value, f"{path}.")
        else:
            flags.append(f"++{path}={hydra_value(strip_markers(value))}")
    return flags


def emptied_mappings(overlay: dict[str, Any], base: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys where ``overlay`` replaces a non-empty mapping of ``base`` by an empty one.

    DVC cannot apply those: ``dvc exp run -S`` empties the mapping in place, and ruamel then writes a commented key
    followed by ``{}`` on the next line, a YAML syntax error (verified with dvc 3.67 on this repo's params.yaml).
    """
    found: list[str] = []
    for key, value in overlay.items():
        if key == REPLACE_KEY or not isinstance(value, dict):
            continue
        path, below = f"{prefix}{key}", base.get(key) if isinstance(base, dict) else None
        if _replaces(value, below):
            if not strip_markers(value) and isinstance(below, dict) and below:
                found.append(path)
        else:
            found += emptied_mappings(value, below, f"{path}.")
    return found


def dvc_set_args(overlay: dict[str, Any], base: dict[str, Any] | None = None) -> list[str]:
    """``["-S", override, "-S", override, ...]`` for ``dvc exp run``.

    Args:
        overlay: a profile's raw overlay.
        base: the params the flags will be applied to (``load_params(...).model_dump()``); when given, overlays
            that DVC cannot apply (``emptied_mappings``) raise.

    Raises:
        ParamsError: the overlay empties a non-empty mapping of ``base``.
    """
    emptied = emptied_mappings(overlay, base or {})
    if emptied:
        raise ParamsError(
            f"the profile replaces the non-empty mapping(s) {emptied} by an empty one, which `dvc exp run -S` cannot "
            "write (it corrupts params.yaml); give the replacement at least one explicit key, or use "
            "`python -m stages.profile apply` and then `dvc exp run`"
        )
    return [token for flag in hydra_overrides(overlay) for token in ("-S", flag)]


# -------------------------------------------------------------------------------------------------- apply in place
def _round_trip_yaml():
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip: comments, key order and the original scalar spelling survive
    rt.preserve_quotes = True
    rt.width = 4096

    def represent_float(representer, value: float):
        # YAML 1.1 readers (PyYAML, load_params) need a dot in exponent floats: 1.0e-05, never 1e-05.
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        elif math.isinf(value):
            text = ".inf" if value > 0 else "-.inf"
        elif math.isnan(value):
            text = ".nan"
        return representer.represent_scalar("tag:yaml.org,2002:float", text)

    def represent_none(representer, value: None):
        return representer.represent_scalar("tag:yaml.org,2002:null", "null")  # ruamel would write nothing

    rt.representer.add_representer(float, represent_float)
    rt.representer.add_representer(type(None), represent_none)
    return rt


def _merge_in_place(target: Any, overlay: dict[str, Any]) -> None:
    """``merge_overlay`` on a ruamel CommentedMap, in place: kept keys keep their comments and position.

    A replaced mapping is edited in place too (keys it drops are deleted, the others set), so its surviving keys
    keep their comments; only a replacement by an empty mapping assigns a fresh ``{}`` (ruamel writes an emptied
    commented block mapping as invalid YAML).
    """
    for key, value in overlay.items():
        if key == REPLACE_KEY:
            continue
        current = target.get(key)
        if isinstance(value, dict) and not _replaces(value, current):
            _merge_in_place(current, value)
        elif isinstance(value, dict) and isinstance(current, dict) and strip_markers(value):
            new = strip_markers(value)
            for old_key in [k for k in current if k not in new]:
                del current[old_key]
            for new_key, new_value in new.items():
                current[new_key] = new_value
        else:
            target[key] = strip_markers(value)


def apply_profile(name: str, params_path: str | Path = "params.yaml", directory: str | Path = PROFILES_DIR) -> Params:
    """Merge profile ``name`` into the file ``params_path`` in place, keeping its comments and key order.

    The result is validated before the file is replaced, so an invalid merge leaves the file untouched.

    Returns:
        the validated params now in the file.
    """
    params_path = Path(params_path)
    overlay = load_profile(name, directory)
    load_params(params_path)  # the file itself must be valid first
    rt = _round_trip_yaml()
    document = rt.load(params_path.read_text())
    _merge_in_place(document, overlay)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    text = buffer.getvalue()
    merged = validate_merged(yaml.safe_load(text) or {}, f"params.yaml with profile {name!r}")
    tmp = params_path.with_name(f".{params_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(params_path)
    return merged


def profile_summary(path: Path) -> str:
    """First comment line of a profile file, without the leading ``# name:``."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").split(":", 1)[-1].strip()
    return ""
