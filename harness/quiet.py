"""`--quiet`: nothing on stderr but errors, including what libraries print on their own.

Our progress bars honour `progress=False`, but the Hugging Face libraries draw their own (the
weights-loading bar of transformers, hub downloads, datasets) and log warnings, so `--quiet` used
to show a loading bar anyway. This switches all of them off, in the libraries already imported and
through the environment for those imported later; warnings are dropped and our log shows errors
only. Results still go to stdout: they are what the command is for.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

#: Read by transformers when it is imported, and by tqdm (>= 4.66) for every bar. The hub's own
#: variable is not used: read once at import, it could never be undone for the rest of the process.
ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TQDM_DISABLE": "1"}


@contextmanager
def quiet() -> Iterator[None]:
    """Within the block, no progress bar or warning this process would print; errors still show.
    Everything is restored after, so a caller in the same process (tests, notebooks) is unaffected."""
    saved_env = {k: os.environ.get(k) for k in ENVIRONMENT}
    imported = {name for name in ("transformers", "datasets") if name in sys.modules}
    root = logging.getLogger()
    saved_level = root.level
    os.environ.update(ENVIRONMENT)
    restore = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root.setLevel(logging.ERROR)
            restore = _silence_libraries()
            yield
    finally:
        for undo in restore:
            undo()
        root.setLevel(saved_level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _enable_late_imports(imported)


def _enable_late_imports(imported: set[str]) -> None:
    """Libraries first imported inside the block start with their bars off: turn them back on,
    unless the user's environment wants them off."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        return
    if "transformers" in sys.modules and "transformers" not in imported:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
    if "datasets" in sys.modules and "datasets" not in imported:
        import datasets

        datasets.enable_progress_bars()


def _silence_libraries() -> list[Callable[[], None]]:
    """Switch off the bars of the Hugging Face libraries already imported; the undo steps."""
    undo: list[Callable[[], None]] = []
    try:  # imported now, so that transformers and datasets imported in the block see its bars off
        from huggingface_hub import utils as hub
    except ImportError:
        hub = None
    if hub is not None and not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        undo.append(hub.enable_progress_bars)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
        hf_logging.set_verbosity_error()
        undo.append(lambda: hf_logging.set_verbosity(level))
    if "datasets" in sys.modules:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    return undo
