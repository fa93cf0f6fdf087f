"""Any realign defense in front of any realign backend, as an lm-eval model: `--model realign`.

lm-eval users already have their tasks, their result files and their habits; this class lets them
measure what a defense costs (or buys) on any lm-eval task without learning realign's runner:

    realign lm-eval --model realign --model_args model=llava-hf/llava-1.5-7b-hf,defense=adashield \\
        --tasks chartqa --batch_size 8 --apply_chat_template

Importing this module registers the class in lm-eval's model registry under `realign` (lm-eval's
CLI cannot import third-party modules, hence `realign lm-eval`, which imports this and hands every
other argument to lm-eval's own CLI). From Python, import it and call
`lm_eval.simple_evaluate(model="realign", model_args=...)`, or pass a `RealignLM` instance.

model_args: `model` (any realign model spec), `defense` (any defense spec; default none), `max_gen_toks`
(when a task sets none; 256 as lm-eval's HF models), `seed`, `dtype`, `cache_dir` (where fitted
defense state is cached; default a temporary folder) and lm-eval's own `batch_size` and `device`
(pass them as lm-eval's --batch_size/--device; a device this machine lacks falls back to the
backend's choice, as in lm-eval's HF models, because lm-eval's CLI passes cuda:0 by default).
lm-eval splits model_args on commas, so a spec's own commas are written `;` (and a literal `;` as `;;`):
`model=hf:pretrained=X;dtype=float32,defense=qguard:guard=openai:model=g;;base_url=URL`. JSON model_args
(lm-eval's CLI) and a dict (`simple_evaluate`) follow the same rule.

Generation behaves as in `realign run`: every request becomes the sample `realign run --task
lm_eval:...` would yield for the same document (harness.lm_eval_shared), requests with the same
settings are cut into batches of `batch_size` in lm-eval's order and each batch goes through the
defense's own `generate` (`harness.runner.generate_batch`, the runner's code), after the calibration
stage has loaded or fitted the defense's state (`harness.calibration`, as the runner does). Answers
are cut at the request's `until` strings afterwards, as lm-eval's HF models cut theirs; a sample whose
generation failed answers "" (lm-eval scores it wrong), with a warning. The backend always applies
its model's chat template, as in every realign run, with or without `--apply_chat_template`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from harness.lm_eval_shared import (
    as_image, cut_at_stops, generation_settings, make_sample, require_lm_eval, single_image, unquote_spec,
)

require_lm_eval()

import lm_eval.models  # noqa: E402,F401  (lm-eval's own placeholders first: it imports them only into an empty registry)
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

from harness import calibration  # noqa: E402
from harness.contracts.backend import GenerationParams  # noqa: E402
from harness.contracts.defense import DefenseContext  # noqa: E402
from harness.errors import DataError  # noqa: E402
from harness.models.resolve import check_device, resolve_backend  # noqa: E402
from harness.registry import defenses  # noqa: E402
from harness.runner import check_calibration, generate_batch  # noqa: E402
from harness.schema import Sample  # noqa: E402
from harness.spec import SpecError  # noqa: E402

log = logging.getLogger(__name__)

NO_LIKELIHOOD = ("model type `realign` cannot compute {kind}: a realign defense is a generation procedure (it may "
                 "rewrite the prompt, add instructions, check or replace the answer), which gives no likelihood of a "
                 "given continuation. Run the generate_until form of the task, or an undefended baseline with "
                 "lm-eval's `hf-multimodal`.")


def _usable(device: str | None) -> str | None:
    """lm-eval's `--device`, or None (the backend picks: a GPU when there is one) when this machine
    lacks it, as lm-eval's own HF models fall back: its CLI passes cuda:0 when the user named none.
    A device written inside the model spec is still checked strictly by realign."""
    if device is None:
        return None
    try:
        check_device(str(device))
    except ValueError as exc:
        log.info("device %s: %s; the backend picks the device", device, exc)
        return None
    return str(device)


class ChatPrompt(str):
    """A chat history lm-eval asked us to template, kept as JSON: the backend templates it itself."""


@register_model("realign")
class RealignLM(LM):
    """A realign backend behind a realign defense, answering lm-eval's generate_until requests."""

    MULTIMODAL = True

    def __init__(self, model: str, defense: str | None = "none", batch_size: int | str = 1,
                 max_batch_size: int | None = None, device: str | None = None, dtype: str | None = None,
                 max_gen_toks: int = 256, seed: int = 0, cache_dir: str | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise SpecError(f"model realign has no argument(s) {', '.join(sorted(unknown))}; valid: model, defense, "
                            "batch_size, device, dtype, max_gen_toks, seed, cache_dir (write a backend option such "
                            "as trust_remote_code inside the model spec: model=hf:pretrained=X;trust_remote_code=true)")
        if str(batch_size).startswith("auto"):
            raise SpecError("model realign needs an integer batch size (a defense's batch is not a plain forward pass)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise SpecError(f"model realign: batch_size must be at least 1, got {batch_size}")
        self.model_spec = unquote_spec(model) or ""
        self.defense_spec = unquote_spec(defense) or "none"
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        # Everything is built and checked before the weights load, as `realign run` plans a run.
        device = _usable(device)
        entry, params = resolve_backend(self.model_spec, {"device": device, "dtype": dtype})
        self.defense = defenses.build(self.defense_spec)
        self.defense.check_backend_class(entry.cls, self.model_spec)
        check_calibration(self.defense)
        self._scratch = None if cache_dir else tempfile.TemporaryDirectory(prefix="realign-lm-eval-fitted-")
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else Path(self._scratch.name)  # type: ignore[union-attr]
        log.info("loading model %s", self.model_spec)
        self.backend = entry.cls(params)
        self.backend.spec = self.model_spec

    # ---- what lm-eval asks of a chat model -----------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        """Names request caches: the model and the defense (a defense may template differently)."""
        return f"realign-{self.model_spec}-{self.defense_spec}".replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "the realign backend's own chat template"

    def apply_chat_template(self, chat_history: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Keep the chat as JSON; `generate_until` reads it back and the backend templates it."""
        if not add_generation_prompt:
            raise DataError("model realign cannot continue a prefilled answer (the task's gen_prefix): every "
                            "defense generates a fresh assistant turn")
        return ChatPrompt(json.dumps(chat_history, ensure_ascii=False))

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes into its results' config: the exact backend and defense."""
        return {"realign": {"model": self.model_spec, "backend": self.backend.identity(),
                            "defense": self.defense.identity()}}

    # ---- requests --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotImplementedError(NO_LIKELIHOOD.format(kind="loglikelihood"))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(NO_LIKELIHOOD.format(kind="loglikelihood_rolling"))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        prepared = [self._prepare(r) for r in requests]
        self._calibrate([s.id for s, _, _ in prepared], disable_tqdm)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (_, params, until) in enumerate(prepared):
            groups.setdefault((dataclasses.astuple(params), tuple(until)), []).append(i)
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"realign {self.defense_spec}")
        for indices in groups.values():
            params, until = prepared[indices[0]][1], prepared[indices[0]][2]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                gens = generate_batch(self.defense, self.backend, [prepared[i][0] for i in chunk], params)
                for i, gen in zip(chunk, gens):
                    if gen.error:
                        log.warning("sample %s: generation failed, answering \"\": %s", gen.sample_id, gen.error)
                    answers[i] = "" if gen.error else cut_at_stops(gen.output, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers

    # ---- internals -------------------------------------------------------------------------------
    def _calibrate(self, ids: list[str], disable_tqdm: bool) -> None:
        """The runner's calibration stage: the defense's fitted state loaded or fitted (cached in
        `cache_dir`), checked against this model and against the documents about to be evaluated."""
        calibration.prepare(self.defense, self.backend, DefenseContext(
            cache_dir=self.cache_dir, eval_ids=frozenset(ids), batch_size=self.batch_size, progress=not disable_tqdm))

    def _prepare(self, request: Any) -> tuple[Sample, GenerationParams, list[str]]:
        """(the sample `realign run` would build for this document, decoding settings, stop strings)."""
        context, gen_kwargs, *rest = request.args
        aux = rest[0] if rest else {}
        where = f"lm-eval task {request.task_name} doc {request.doc_id}"
        if aux.get("audio"):
            raise DataError(f"{where}: model realign takes text and images, not audio")
        text = self._user_text(context, where)
        raw = single_image(aux.get("visual"), where)
        image = None if raw is None else (lambda raw=raw: as_image(raw, where))  # read in the batch: a bad image is one error
        settings = generation_settings(gen_kwargs, self.max_gen_toks)
        params, until = self._decoding(settings, where)
        return make_sample(request.task_name, request.doc_id, text, image, settings), params, until

    @staticmethod
    def _user_text(context: str, where: str) -> str:
        """The document's text: lm-eval's plain context, or the one user turn of a chat we kept."""
        if not isinstance(context, ChatPrompt):
            return context
        messages = json.loads(context)
        roles = [m.get("role") for m in messages]
        if roles != ["user"] or not isinstance(messages[0].get("content"), str):
            raise DataError(f"{where}: model realign sends one user turn per document (a defense adds its own "
                            f"instructions), but this chat has turns {roles}; leave out --system_instruction and any "
                            "task description, and use --fewshot_as_multiturn false for few-shot tasks")
        return str(messages[0]["content"])

    def _decoding(self, settings: dict[str, Any], where: str) -> tuple[GenerationParams, list[str]]:
        """lm-eval's normalised generation kwargs as realign decoding settings; anything a realign
        backend cannot honour is refused rather than silently ignored."""
        rest = dict(settings)
        until = list(rest.pop("until", []))
        max_new = int(rest.pop("max_gen_toks"))
        do_sample = bool(rest.pop("do_sample", False))
        temperature = float(rest.pop("temperature", 0.0) or 0.0)
        top_p = rest.pop("top_p", None)
        top_k = rest.pop("top_k", None)
        if rest.pop("num_beams", 1) not in (None, 1):
            raise DataError(f"{where}: realign backends decode greedily or by sampling, not by beam search")
        if rest:
            raise DataError(f"{where}: generation kwarg(s) {', '.join(sorted(rest))} cannot be honoured by realign "
                            "backends (they take max_gen_toks, until, do_sample, temperature, top_p)")
        if do_sample and temperature <= 0:
            raise DataError(f"{where}: do_sample=true needs a temperature above 0")
        if do_sample and top_k not in (None, 0):
            raise DataError(f"{where}: realign backends sample with temperature and top_p only, not top_k")
        params = GenerationParams(
            max_new_tokens=max_new, do_sample=do_sample, temperature=temperature if do_sample else 1.0,
            top_p=float(top_p) if do_sample and top_p is not None else 1.0, seed=self.seed)
        return params, until
