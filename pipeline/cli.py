"""What every stage CLI shares: offline environment, logging, params loading and the exit-code contract.

Exit codes (STYLE §5): 0 success, 2 usage/config errors, 1 runtime failures. A failure prints one line to stderr
saying what failed and how to fix it; the traceback only with ``--debug``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer

from pipeline.params import Params, ParamsError, load_params

logger = logging.getLogger("setemb.stage")

T = TypeVar("T")

# Offline and quiet by default; a user may still override any of them in the environment.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
}


class StageError(RuntimeError):
    """A runtime failure with a message meant for the user (exit code 1)."""


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def setup_logging(quiet: bool = False) -> None:
    """``time | level | logger | message`` on stderr, configured once per stage process ([OC] logger.py)."""
    root = logging.getLogger()
    if any(getattr(h, "_setemb", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s", "%H:%M:%S"))
    handler._setemb = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("urllib3", "filelock", "httpx", "numcodecs", "matplotlib", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def progress_enabled(quiet: bool) -> bool:
    """Bars only for a human: stderr is a TTY and --quiet is off (STYLE §5)."""
    return not quiet and sys.stderr.isatty()


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def stage_errors(debug: bool = False) -> Iterator[None]:
    """Map known failures to one stderr line and the contract's exit code.

    Only named exception types are caught, so ``typer.Exit`` (a RuntimeError subclass) passes through untouched.
    """
    try:
        yield
    except ParamsError as e:
        if debug:
            raise
        raise _fail(str(e), 2) from None
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        if debug or not isinstance(e, _runtime_failures()):
            raise
        raise _fail(str(e) or type(e).__name__, 1) from None


def _runtime_failures() -> tuple[type[BaseException], ...]:
    """Failures reported as one line with exit 1; anything else is a bug and keeps its traceback."""
    from setemb.store import IncompleteStoreError
    from setemb.training import NonFiniteLossError

    return (StageError, IncompleteStoreError, NonFiniteLossError, FileNotFoundError, ValueError, OSError)


def start_stage(name: str, params_path: Path, *, quiet: bool, debug: bool) -> Params:
    """Environment, logging and params for a stage; logs the resolved params, git SHA and device."""
    set_offline_env()
    setup_logging(quiet)
    with stage_errors(debug):
        params = load_params(params_path)
    import torch  # deferred: `--help` must not pay for it

    device = "cuda" if torch.cuda.is_available() else "cpu"
    logger.info("%s | git %s | device %s | params %s", name, git_sha(), device, params_path)
    logger.debug("resolved params: %s", params.model_dump_json())
    return params


def call(fn: Callable[..., T], *args, debug: bool = False, **kwargs) -> T:
    """Run a stage's ``run_*`` function under the exit-code contract."""
    with stage_errors(debug):
        return fn(*args, **kwargs)
