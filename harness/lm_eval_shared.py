"""What both directions of the lm-eval bridge agree on, written once so they cannot drift apart.

A realign run of an lm-eval task (`tasks.lm_eval_task`) and lm-eval running the `realign` model
(`harness.lm_eval_model`) must hand a defense the very same sample for the same document: the same
id (`lm_eval/<task>/<doc index>`), the same text (lm-eval's context with its `<image>` placeholders
taken out: realign requests put the image first, then the text), the same single image and the same
recorded generation settings. They must also cut an answer at lm-eval's stop sequences the same
way. Both import this module; neither imports the other.

lm-eval is an optional extra (`pip install 'realign[lm-eval]'`); `require_lm_eval` says so when it is
missing instead of failing with a bare ImportError deep inside a run.
"""

from __future__ import annotations

import io
from typing import Any, Callable

from PIL import Image

from harness.errors import DataError, ImageLoadError
from harness.schema import Sample

#: lm-eval's generic image placeholder (lm_eval.models.hf_vlms.DEFAULT_IMAGE_PLACEHOLDER).
IMAGE_PLACEHOLDER = "<image>"
MIN_VERSION = "0.4.13"


def require_lm_eval() -> str:
    """lm-eval's version, or a DataError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise DataError(f"the lm-eval bridge needs lm-eval {MIN_VERSION} or newer: "
                        "pip install 'realign[lm-eval]' (or pip install 'lm-eval>=0.4.13')") from None
    from importlib.metadata import version

    return str(getattr(lm_eval, "__version__", None) or version("lm_eval"))


def sample_id(task_name: str, doc_id: int) -> str:
    """The stable id of one lm-eval document: its task's name and its index among the eval docs."""
    return f"lm_eval/{task_name}/{doc_id}"


def unquote_spec(value: Any) -> str | None:
    """A realign spec written inside lm-eval's comma-separated `model_args`: `;` stands for `,`
    and `;;` for a literal `;` (`model=hf:pretrained=X;dtype=float32`). None stays None."""
    if value is None:
        return None
    return str(value).replace(";;", "\0").replace(";", ",").replace("\0", ";")


def prompt_text(context: str) -> str:
    """The sample text of an lm-eval context: the placeholders removed, nothing else touched (lm-eval's
    hf-multimodal keeps the text around a leading `<image>` exactly as written, too)."""
    return context.replace(IMAGE_PLACEHOLDER, "")


def as_image(obj: Any, where: str) -> Image.Image:
    """One image of a document as PIL: already one, `datasets`' undecoded {"bytes", "path"}, or a path."""
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, dict) and (obj.get("bytes") or obj.get("path")):
        source = io.BytesIO(obj["bytes"]) if obj.get("bytes") else obj["path"]
    elif isinstance(obj, str):
        source = obj
    else:
        raise ImageLoadError(f"{where}: doc_to_image gave a {type(obj).__name__}, not an image")
    try:
        with Image.open(source) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as exc:
        raise ImageLoadError(f"{where}: image cannot be decoded: {exc}") from None


def single_image(visual: Any, where: str) -> Any | None:
    """The one image of a document (None for a text-only one). Realign samples and every defense's
    requests carry one image; a document with several is refused rather than silently cut. The same
    image object listed twice (MMMU's doc_to_image repeats an image its question cites twice) is one."""
    items = [] if visual is None else list(visual) if isinstance(visual, (list, tuple)) else [visual]
    items = list({id(item): item for item in items}.values())
    if len(items) > 1:
        raise DataError(f"{where} has {len(items)} images; realign samples carry one image (every defense builds "
                        "one-image requests), so multi-image documents cannot be run through realign")
    return items[0] if items else None


def generation_settings(gen_kwargs: dict[str, Any] | None, default_max: int = 256) -> dict[str, Any]:
    """A task's generation kwargs as lm-eval's own models read them (`normalize_gen_kwargs`: until as
    a list, max_gen_toks from any alias, do_sample decided from the temperature), JSON-ready."""
    from lm_eval.models.utils import normalize_gen_kwargs

    settings = dict(normalize_gen_kwargs(dict(gen_kwargs or {}), default_max_gen_toks=default_max))
    settings["until"] = [str(u) for u in settings.get("until") or []]
    return settings


def cut_at_stops(text: str, until: list[str]) -> str:
    """The answer up to lm-eval's first stop sequence, as lm-eval's HF models cut theirs (each
    non-empty stop in turn). A greedy answer cut here equals one whose decoding stopped there."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def make_sample(task_name: str, doc_id: int, context: str, image: Image.Image | Callable[[], Image.Image] | None,
                settings: dict[str, Any]) -> Sample:
    """The realign sample of one lm-eval request, identical in both directions of the bridge."""
    sid = sample_id(task_name, doc_id)
    return Sample(
        id=sid,
        text=prompt_text(context),
        image=image,
        category=task_name,
        meta={"lm_eval_task": task_name, "doc_id": doc_id, "generation_kwargs": settings},
        image_ref=f"{sid}/image" if image is not None else None,
    )
