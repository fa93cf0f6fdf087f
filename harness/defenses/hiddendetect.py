"""HiddenDetect: refuse a request when refusal shows in the hidden states of its prompt
(Jiang et al., ACL 2025, arXiv 2502.14744; public code github.com/leigest519/HiddenDetect).

One prefill per request. Every decoder layer's last-prompt-token state is read through the
model's final norm and LM head (the logit lens, `lens_logits`), and F_l is the cosine of those
logits with R, a multi-hot vector at the first token id of each refusal word. The score S is the
trapezoid area (unit spacing) of F over a band of layers; a request with S > τ is refused with a
fixed sentence, every other one is answered by the model as usual (one batched generate call for
the unflagged samples only). The detector needs nothing but the model it guards.

Band and τ come from calibration (`calibration_unsafe=`/`calibration_safe=` task specs fitted on
the fly and cached, or `state=FILE` from `realign fit`): the band is the public code's rule, the
layers whose FDV_l = mean F_l(unsafe) - mean F_l(safe) exceeds FDV at the last layer, and τ is set
at a target false-positive rate on the safe set (the public code reports AUROC only and has no τ).
`layers=` and `threshold=` override either; with both given no calibration is needed.

Harness choices, all parameters or documented here:
  - the flag rule is strict, S > τ (a score exactly at τ is answered), as in the public code's
    framing "unsafe if S > τ"; τ at `fpr` is the (k+1)-th largest safe score, k = floor(fpr·n);
  - the band rule is closed into a contiguous span by default (`band_rule=span`; the public scorer
    slices F[s:e+1]), or kept as the exact layers (`exceed`); a one-layer band scores its F;
  - every layer is normalised once: the lens reads decoder-layer outputs, whereas the public code
    applies the norm to HF's hidden_states, whose last entry is already normalised (so its
    last-layer F, the FDV baseline, went through the norm twice);
  - R spans the model's whole output vocabulary (the public code hard-codes 32,000 for LLaVA);
  - the request is the sample as sent (its image, if any, and its text, in the model's chat
    template), for calibration and evaluation alike.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from harness.contracts.backend import Backend, Completion, GenerationParams
from harness.contracts.defense import (
    CalibrationPlan,
    CalibrationSet,
    Defense,
    FittedState,
    generation,
    sample_request,
    timed_generate,
)
from harness.defenses.hiddendetect_state import (
    REFUSAL_WORDS,
    Decision,
    HiddenDetectState,
    band_score,
    decide,
    fdv_curve,
    layer_cosines,
    load_words,
    words_digest,
)
from harness.defenses.layers import check_layers, parse_layers
from harness.defenses.steering_base import round_list
from harness.defenses.vectors import calibration_record, model_key
from harness.errors import CapabilityError, DataError
from harness.refusal import BLOCKED_REPLY
from harness.registry import defense
from harness.schema import Generation, Sample

log = logging.getLogger(__name__)


def num_layers(backend: Backend) -> int:
    """The decoder depth. The logit-lens contract takes layer indices but does not say how many
    there are; every backend that offers it (HF) also reports its decoder size."""
    size = getattr(backend, "decoder_size", None)
    if size is None:
        raise CapabilityError(f"backend {backend.spec!r} does not report its decoder depth (decoder_size)")
    return int(size().num_layers)


@defense("hiddendetect")
class HiddenDetect(Defense):
    """HiddenDetect: refuse when the logit lens of the prompt's hidden states leans towards refusal words."""

    requires = frozenset({"logit_lens"})

    @dataclass
    class Params:
        fpr: float = 0.05  # target false-positive rate on the safe calibration set (harness choice)
        band_rule: Literal["span", "exceed"] = "span"  # how the FDV rule's layers become the band
        layers: str | None = None  # explicit band (any layer spec, e.g. 16-29 or depth:0.5-0.9)
        threshold: float | None = None  # explicit τ (OSB uses 0.2 on LLaVA)
        words_file: str | None = None  # refusal words, one per line (default: the public code's list)
        refusal: str = BLOCKED_REPLY  # the reply to a flagged request
        state: str | None = None  # a file from `realign fit`
        calibration_unsafe: str | None = None
        calibration_safe: str | None = None
        calibration_limit: int | None = None
        allow_overlap: bool = False

        def __post_init__(self) -> None:
            if not 0.0 <= self.fpr < 1.0:
                raise ValueError("fpr must be in [0, 1)")
            if (self.calibration_unsafe is None) != (self.calibration_safe is None):
                raise ValueError("calibration_unsafe and calibration_safe go together")
            if self.calibration_unsafe and self.state:
                raise ValueError("give state=FILE or calibration_unsafe=/calibration_safe=, not both")
            if not self.refusal.strip():
                raise ValueError("refusal must not be empty")

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        if params.layers is not None:
            check_layers(params.layers)
        self.words: tuple[str, ...] = load_words(params.words_file) if params.words_file else REFUSAL_WORDS
        self.state: HiddenDetectState | None = None
        self.decision: Decision | None = None  # set by use_state for the backend being evaluated

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["refusal_words_sha256"] = words_digest(self.words)
        return ident

    # ---- calibration -------------------------------------------------------------------------
    def calibration(self) -> CalibrationPlan | None:
        p = self.params
        sets = {"unsafe": p.calibration_unsafe, "safe": p.calibration_safe} if p.calibration_unsafe else {}
        if not sets and not p.state and p.layers is not None and p.threshold is not None:
            return None  # band and τ both given: nothing to calibrate
        return CalibrationPlan(
            kind="hiddendetect", file=p.state, sets=sets, limit=p.calibration_limit,  # type: ignore[arg-type]
            allow_overlap=p.allow_overlap, fit_key={"words": list(self.words)},
            missing="hiddendetect needs state=FILE (from `realign fit`), calibration_unsafe=TASK_SPEC and "
                    "calibration_safe=TASK_SPEC, or both layers= and threshold=")

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> HiddenDetectState:
        """F at every layer for every calibration sample, per role; the manifest records the band,
        τ and AUROC these curves give with this defense's parameters, and the FDV curve."""
        missing = {"unsafe", "safe"} - set(sets)
        if missing:
            raise DataError(f"hiddendetect fit needs calibration sets unsafe and safe (missing {sorted(missing)}); "
                            "use --calibration-unsafe/--calibration-safe")
        for role in ("unsafe", "safe"):
            if not sets[role].samples:
                raise DataError(f"calibration task {sets[role].spec!r} ({role}) gave no samples")
        curves, vocab = {}, 0
        for role in ("unsafe", "safe"):
            samples = sets[role].samples
            chunks = []
            for start in tqdm(range(0, len(samples), batch_size), desc=f"hiddendetect fit ({role})",
                              disable=not progress, unit="batch"):
                f, vocab = self.curves(backend, samples[start : start + batch_size])
                chunks.append(f)
            curves[role] = torch.cat(chunks)
        depth = num_layers(backend)
        decision = self._decide(depth, curves["unsafe"], curves["safe"])
        ids = self.token_ids(backend)
        roles = {role: sets[role] for role in ("unsafe", "safe")}
        return HiddenDetectState(curves, {
            "defense": getattr(self, "registered_name", type(self).__name__),
            "model_key": model_key(backend),
            "calibration": calibration_record(";".join(f"{r}={cs.spec}" for r, cs in roles.items()),
                                              [s.id for cs in roles.values() for s in cs.samples]),
            **{f"calibration_{r}": {"spec": cs.spec, "n": len(cs.samples), "ids": [s.id for s in cs.samples]}
               for r, cs in roles.items()},
            "words": list(self.words),
            "token_ids": [{"word": w, "id": i} for w, i in zip(self.words, ids)],
            "vocab_size": vocab,
            "num_layers": depth,
            "fdv": round_list(fdv_curve(curves["unsafe"], curves["safe"])),
            "fitted_with": {k: getattr(self.params, k) for k in ("band_rule", "layers", "fpr", "threshold")},
            "band": decision.band, "band_source": decision.band_source,
            "tau": decision.tau, "tau_source": decision.tau_source,
            "auroc_calibration": decision.calibration_auroc,
            "calibration_fpr": _share_above(band_score(curves["safe"], decision.band), decision.tau),
            "calibration_tpr": _share_above(band_score(curves["unsafe"], decision.band), decision.tau),
        })

    def load_state(self, path: str | Path) -> FittedState:
        return HiddenDetectState.load(path)

    def use_state(self, state: FittedState, backend: Backend) -> None:
        """Keep the curves and derive band and τ from them with this run's parameters; refuse a state
        measured with other refusal words or a tokenizer that maps them to other ids."""
        assert isinstance(state, HiddenDetectState)
        if list(state.manifest.get("words", [])) != list(self.words):
            raise DataError("hiddendetect state was fitted with another refusal word list "
                            f"({len(state.manifest.get('words', []))} words); fit it with this words_file")
        fitted_ids = [int(t["id"]) for t in state.manifest.get("token_ids", [])]
        if fitted_ids != self.token_ids(backend):
            raise DataError("hiddendetect state's refusal token ids differ from this tokenizer's; refit for this model")
        self.state = state
        self.decision = self._decide(num_layers(backend), state.curves["unsafe"], state.curves["safe"])
        d = self.decision
        log.info("hiddendetect: band %s (%s), tau %.6g (%s), calibration AUROC %s",
                 d.band, d.band_source, d.tau, d.tau_source, d.calibration_auroc)

    def _decide(self, depth: int, f_unsafe: torch.Tensor | None, f_safe: torch.Tensor | None) -> Decision:
        p = self.params
        band = parse_layers(p.layers, depth) if p.layers is not None else None
        return decide(depth, band, p.band_rule, p.threshold, p.fpr, f_unsafe, f_safe)

    def current(self, backend: Backend) -> Decision:
        """The band and τ in force: from the installed state, or from explicit layers= and threshold=
        (resolved against this backend's depth on every call, since one defense may serve several models)."""
        if self.calibration() is None:
            return self._decide(num_layers(backend), None, None)
        if self.decision is None:
            raise RuntimeError("hiddendetect: no calibration; the calibration stage "
                               "(harness.calibration.prepare) must run before generate()")
        return self.decision

    # ---- scoring -----------------------------------------------------------------------------
    def token_ids(self, backend: Backend) -> list[int]:
        """The first token id of each refusal word in this backend's tokenizer (cheap; not cached,
        since one defense may serve several models)."""
        return [int(i) for i in backend.token_ids(list(self.words))]  # type: ignore[attr-defined]

    def curves(self, backend: Backend, samples: list[Sample]) -> tuple[torch.Tensor, int]:
        """(F [n, num_layers] float64, vocabulary size): one batched prefill for the samples."""
        layers = list(range(num_layers(backend)))
        logits = backend.lens_logits([sample_request(s) for s in samples], layers)  # type: ignore[attr-defined]
        return layer_cosines(logits, self.token_ids(backend)), int(logits.shape[-1])

    def scores(self, backend: Backend, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(S [n], F [n, num_layers]) with the band in force."""
        f, _ = self.curves(backend, samples)
        return band_score(f, self.current(backend).band), f

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        if not samples:
            return []
        decision = self.current(backend)
        start = time.perf_counter()
        score, f = self.scores(backend, samples)
        detect = (time.perf_counter() - start) / len(samples)
        flagged = [bool(s > decision.tau) for s in score.tolist()]
        requests = [sample_request(s) for s in samples]
        answer = [i for i, hit in enumerate(flagged) if not hit]
        completions: dict[int, Completion] = {}
        per_answer = 0.0
        if answer:
            done, per_answer = timed_generate(backend, [requests[i] for i in answer], params)
            completions = dict(zip(answer, done))
        out = []
        for i, sample in enumerate(samples):
            hit = flagged[i]
            trace = {
                "score": float(score[i]), "tau": decision.tau, "flagged": hit, "band": decision.band,
                "band_source": decision.band_source, "tau_source": decision.tau_source,
                "layer_cosines": round_list(f[i]), "model_calls": 0 if hit else 1, "extra_forward_passes": 1,
            }
            completion = Completion(text=self.params.refusal) if hit else completions[i]
            seconds = detect + (0.0 if hit else per_answer)
            out.append(generation(sample, requests[i], completion, seconds, trace, detect_seconds=detect))
        return out


def _share_above(scores: torch.Tensor, tau: float) -> float:
    return float((scores > tau).double().mean()) if scores.numel() else float("nan")


