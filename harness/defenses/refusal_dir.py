"""Refusal-direction steering (Arditi et al., NeurIPS 2024, "Refusal in language models is mediated
by a single direction"; public code andyrdt/refusal_direction `9d852fa`).

r = mean harmful - mean harmless of the block-l input at a post-instruction template position, from
TEXT-ONLY prompts through the VLM's own chat template (`refusal_dir_select` fits every candidate
(position, layer) and applies the public selection rule). At inference on image inputs:

  - `mode=actadd`: x <- x + α·r (r unnormalised) at the block-l input, at the chosen positions
    (default: every prompt and generated position, as the public code's pre-hook). "Block-l input"
    is what decoder layer l receives, HF's `hidden_states[l]`; for l >= 1 that equals adding α·r to the
    output of layer l-1, for l = 0 to the merged input embeddings (`harness.models.hf_directions`).
    With several layers (`layer=` spec), each adds α·r[p, l] from its own layer.
  - `mode=ablate`: x <- x - (x·r̂)r̂ at every block input and every attention and MLP output, every
    position (removes refusal: the paper's jailbreak, offered to audit a direction, not to defend).
  - `gate=true` (harness choice; actadd only): add only to inputs whose projection h^l[p]·r̂ at the
    lowest edited block's input, read on the undefended prefill, is STRICTLY above τ; τ is set on benign
    inputs as sent (`calibration_gate=`, images included) at `gate_fpr` (the (k+1)-th largest benign
    projection, k = floor(fpr·n): at most that share of benign inputs is steered). An always-on
    addition makes the model refuse everything (the public results: harmless compliance 0.99 -> 0.00).

Positions are counted from the prompt end (left padding, so -1 is every sample's last prompt token).
The gate is read inside the generation's own prefill, so it costs no extra forward pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from harness.contracts.backend import Backend, GenerationParams
from harness.contracts.defense import CalibrationPlan, CalibrationSet, Defense, FittedState, generation, sample_request
from harness.defenses.layers import check_layers, parse_layers
from harness.defenses.refusal_dir_select import FitConfig, fit_candidates, states
from harness.defenses.refusal_dir_state import RefusalDirState
from harness.defenses.steering_base import round_list
from harness.defenses.thresholds import auroc, threshold_at_fpr
from harness.defenses.vectors import calibration_record, model_key
from harness.errors import CapabilityError, DataError
from harness.models import hf_directions
from harness.registry import defense
from harness.schema import Generation, Sample

log = logging.getLogger(__name__)
FIT_PARAMS = ("n_train", "n_val", "seed", "filter", "refusal_tokens", "post_instruction_positions",
              "kl_threshold", "max_layer_fraction")
GATE_ROLES = ("gate", "anchor")  # `realign fit --calibration SPEC` passes the gate set as `anchor`


@dataclass(frozen=True)
class Choice:
    """What a run applies on one model: position, layers, their directions, the gate's τ."""

    position: int
    layers: list[int]
    source: str  # "selection" or "layer="
    directions: dict[int, torch.Tensor]
    gate_direction: torch.Tensor  # r̂[p, lowest layer]
    threshold: float | None
    threshold_source: str | None
    gate_auroc: float | None


@defense("refusal_dir")
class RefusalDir(Defense):
    """Refusal-direction steering: add α·r (or ablate r̂) with r the harmful-minus-harmless text direction."""

    requires = frozenset({"steering"})

    @dataclass
    class Params:
        mode: Literal["actadd", "ablate"] = "actadd"
        alpha: float = 1.0  # actadd coefficient in [0, 1] (the public code uses +1 to induce refusal)
        layer: str | None = None  # None: the public selection; else a layer spec (8, 8-10, depth:0.4-0.5...)
        position: int | None = None  # post-instruction position from the prompt end (None: the selected one)
        positions: list[Literal["last_prompt", "prompt", "generated"]] = field(
            default_factory=lambda: ["prompt", "generated"])
        apply_to: Literal["image", "all"] = "image"  # which inputs are steered at all
        gate: bool = False
        gate_fpr: float = 0.05
        gate_threshold: float | None = None  # explicit τ (skips the benign calibration)
        post_instruction_positions: int | None = None  # None: the template's tokens after the user text
        filter: bool = True
        refusal_tokens: list[str] = field(default_factory=lambda: ["I"])  # first token of each word
        n_train: int = 128
        n_val: int = 32
        seed: int = 42
        kl_threshold: float = 0.1
        max_layer_fraction: float = 0.8
        direction: str | None = None  # a file from `realign fit`
        calibration_unsafe: str | None = None
        calibration_safe: str | None = None
        calibration_gate: str | None = None  # benign inputs as sent (with images) for the gate's τ
        calibration_limit: int | None = None
        allow_overlap: bool = False

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError("alpha must be in [0, 1]")
            if not self.positions:
                raise ValueError("positions must name at least one of last_prompt, prompt, generated")
            if (self.calibration_unsafe is None) != (self.calibration_safe is None):
                raise ValueError("calibration_unsafe and calibration_safe go together")
            if self.direction and self.calibration_unsafe:
                raise ValueError("give direction=FILE or calibration_unsafe=/calibration_safe=, not both")
            if self.calibration_gate and not self.calibration_unsafe:
                raise ValueError("calibration_gate= needs calibration_unsafe=/calibration_safe= (the gate's "
                                 "projections are measured on the directions fitted with it)")
            if self.gate and self.mode != "actadd":
                raise ValueError("gate applies to mode=actadd only")
            if self.gate and self.gate_threshold is None and not (self.calibration_gate or self.direction):
                raise ValueError("gate=true needs calibration_gate=TASK_SPEC (benign image inputs), a direction "
                                 "file fitted with one, or gate_threshold=")
            if not 0.0 <= self.gate_fpr < 1.0:
                raise ValueError("gate_fpr must be in [0, 1)")
            if self.position is not None and self.position >= 0:
                raise ValueError("position counts from the prompt end: -1 is the last prompt token")
            if self.post_instruction_positions is not None and self.post_instruction_positions < 1:
                raise ValueError("post_instruction_positions must be at least 1")
            if min(self.n_train, self.n_val) < 1 or not 0.0 < self.max_layer_fraction <= 1.0 or self.kl_threshold < 0:
                raise ValueError("n_train and n_val must be >= 1, max_layer_fraction in (0, 1], kl_threshold >= 0")
            if not self.refusal_tokens:
                raise ValueError("refusal_tokens must name at least one word")

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        if params.layer is not None:
            check_layers(params.layer, "layer")
        self.state: RefusalDirState | None = None
        self.choice: Choice | None = None

    def check_backend_class(self, backend_cls: type, model_spec: str) -> None:
        """Steering is not enough: the defense hooks the decoder's blocks, attention and MLP itself."""
        super().check_backend_class(backend_cls, model_spec)
        if not callable(getattr(backend_cls, "encode", None)):
            raise CapabilityError(f"defense {self.spec!r} hooks the decoder's blocks, attention and MLP modules "
                                  f"itself, which backend {model_spec!r} ({backend_cls.__name__}) does not allow; "
                                  "use an HF model")

    # ---- calibration -------------------------------------------------------------------------
    def calibration(self) -> CalibrationPlan:
        p = self.params
        sets = {"unsafe": p.calibration_unsafe, "safe": p.calibration_safe} if p.calibration_unsafe else {}
        if p.calibration_gate:
            sets["gate"] = p.calibration_gate
        return CalibrationPlan(
            kind="refusal_dir", file=p.direction, sets=sets, limit=p.calibration_limit,  # type: ignore[arg-type]
            allow_overlap=p.allow_overlap, fit_key={k: getattr(p, k) for k in FIT_PARAMS},
            missing="refusal_dir needs direction=FILE (from `realign fit`) or "
                    "calibration_unsafe=TASK_SPEC and calibration_safe=TASK_SPEC (text-only harmful / harmless)")

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> RefusalDirState:
        """Candidates and selection scores on the text-only sets; the gate projections on the gate set."""
        self.check_backend(backend)
        missing = [k for k in ("unsafe", "safe") if k not in sets or not sets[k].samples]
        if missing:
            raise DataError(f"refusal_dir fit needs non-empty {' and '.join(missing)} calibration set(s) "
                            "(--calibration-unsafe SPEC --calibration-safe SPEC)")
        p = self.params
        suffix = hf_directions.template_suffix_ids(backend.processor, backend.tokenizer)  # type: ignore[attr-defined]
        n_pos = p.post_instruction_positions or max(1, len(suffix))
        token_ids = [int(i) for i in backend.token_ids(list(p.refusal_tokens))]  # type: ignore[attr-defined]
        cfg = FitConfig(p.n_train, p.n_val, p.seed, p.filter, token_ids, n_pos, p.kl_threshold, p.max_layer_fraction,
                        batch_size, progress)
        fit = fit_candidates(backend, [(s.id, s.query) for s in sets["unsafe"].samples],
                             [(s.id, s.query) for s in sets["safe"].samples], cfg)
        texts = {s.id: s.query for s in sets["unsafe"].samples}
        gate: dict[str, torch.Tensor] = {}
        gate_role = next((r for r in GATE_ROLES if r in sets), None)
        if gate_role:
            gate["gate_benign"] = self._gate_projections(backend, sets[gate_role].samples, fit.candidates, batch_size)
            harmful_val = [Sample(i, texts[i]) for i in fit.used["harmful_val"]]
            gate["gate_harmful_val"] = self._gate_projections(backend, harmful_val, fit.candidates, batch_size)
        roles = {"unsafe": sets["unsafe"], "safe": sets["safe"], **({"gate": sets[gate_role]} if gate_role else {})}
        sel = fit.selection
        manifest = {
            "defense": getattr(self, "registered_name", type(self).__name__),
            "model_key": model_key(backend),
            "calibration": calibration_record(";".join(f"{r}={cs.spec}" for r, cs in roles.items()),
                                              [s.id for cs in roles.values() for s in cs.samples]),
            **{f"calibration_{r}": {"spec": cs.spec, "n": len(cs.samples)} for r, cs in roles.items()},
            "params": {k: getattr(p, k) for k in FIT_PARAMS},
            "post_instruction_tokens": [int(i) for i in suffix[-n_pos:]],
            "post_instruction_text": [backend.tokenizer.decode([i]) for i in suffix[-n_pos:]],  # type: ignore[attr-defined]
            "refusal_token_ids": token_ids,
            "selection": {"position": sel.position, "layer": sel.layer, "discarded": sel.reasons},
            "used_ids": fit.used,
            **fit.record,
        }
        if sel.position is None:
            log.warning("refusal_dir: every candidate was discarded by the selection rule (%s)", sel.reasons)
        return RefusalDirState(fit.candidates, fit.scores, gate, manifest)

    def _gate_projections(self, backend: Backend, samples: list[Sample], candidates: torch.Tensor,
                          batch_size: int) -> torch.Tensor:
        """[n, P, L] float64: each input's block inputs at the P positions projected on r̂[p, l]."""
        n_pos, n_layers, _ = candidates.shape
        requests = [sample_request(s) for s in samples]
        batches = [backend.encode(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]  # type: ignore[attr-defined]
        x = states(backend.model, batches, list(range(n_layers)), n_pos)  # type: ignore[attr-defined]
        return hf_directions.project(x, hf_directions.unit(candidates.double()))

    def load_state(self, path: str | Path) -> FittedState:
        return RefusalDirState.load(path)

    def use_state(self, state: FittedState, backend: Backend) -> None:
        """Resolve position, layers and τ for this model from the state and this run's parameters."""
        assert isinstance(state, RefusalDirState)
        p = self.params
        selected = state.manifest.get("selection", {})
        num_layers = int(state.candidates.shape[1])
        if p.layer is None and selected.get("layer") is None:
            raise DataError("the refusal-direction selection discarded every candidate (see the state's "
                            "manifest, `selection.discarded`); give layer= (and position=) explicitly")
        position = p.position if p.position is not None else int(selected.get("position") or -1)
        layers = parse_layers(p.layer, num_layers, "layer") if p.layer is not None else [int(selected["layer"])]
        if p.mode == "ablate" and len(layers) != 1:
            raise DataError(f"mode=ablate projects out one direction; layer={p.layer!r} names {len(layers)} layers")
        directions = {l: state.direction(position, l) for l in layers}
        gate_dir = hf_directions.unit(directions[layers[0]].double())
        threshold, source, score_auc = None, None, None
        if "gate_benign" in state.gate:
            benign = state.gate["gate_benign"][:, position, layers[0]]
            score_auc = auroc(state.gate["gate_harmful_val"][:, position, layers[0]], benign)
        if p.gate and p.gate_threshold is not None:
            threshold, source = float(p.gate_threshold), "gate_threshold"
        elif p.gate:
            if "gate_benign" not in state.gate:
                raise DataError("gate=true needs benign gate projections: fit with calibration_gate=TASK_SPEC "
                                "(or `realign fit --calibration SPEC`), or give gate_threshold=")
            threshold, source = threshold_at_fpr(benign, p.gate_fpr), f"fpr={p.gate_fpr}"
        self.state = state
        self.choice = Choice(position, layers, "layer=" if p.layer is not None else "selection", directions,
                             gate_dir, threshold, source, score_auc)
        log.info("refusal_dir: %s at layers %s, position %d (%s); gate τ=%s (%s), AUROC %s",
                 p.mode, layers, position, self.choice.source, threshold, source, score_auc)

    def current(self) -> Choice:
        if self.choice is None:
            raise RuntimeError("refusal_dir: no fitted direction; the calibration stage "
                               "(harness.calibration.prepare) must run before generate()")
        return self.choice

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        if not samples:
            return []
        self.check_backend(backend)
        choice, p = self.current(), self.params
        start = time.perf_counter()
        requests = [sample_request(s) for s in samples]
        eligible = torch.tensor([p.apply_to == "all" or s.image is not None for s in samples], dtype=torch.float32)
        seen: dict[str, torch.Tensor] = {}
        if p.mode == "ablate":
            hooks = hf_directions.ablate(backend.model, choice.directions[choice.layers[0]], eligible)  # type: ignore[attr-defined]
        else:
            vectors = {l: (p.alpha * r).unsqueeze(0).expand(len(samples), -1) for l, r in choice.directions.items()}
            hooks = hf_directions.add_to_block_inputs(backend.model, vectors, frozenset(p.positions),  # type: ignore[attr-defined]
                                                      gate=lambda hidden: self._gate(hidden, eligible, seen))
        with hooks:
            completions = backend.generate(requests, params)
        seconds = (time.perf_counter() - start) / len(samples)
        out = []
        for i, (s, r, c) in enumerate(zip(samples, requests, completions)):
            applied = bool(seen["factor"][i]) if "factor" in seen else bool(eligible[i])
            trace: dict[str, Any] = {
                "model_calls": 1, "extra_forward_passes": 0, "mode": p.mode, "layers": choice.layers,
                "position": choice.position, "choice": choice.source, "applied": applied,
            }
            if p.mode == "actadd":
                trace.update(alpha=p.alpha, vector_norms=round_list(torch.stack(
                    [p.alpha * choice.directions[l].norm() for l in choice.layers])),
                    projection=float(seen["projection"][i]))
            if p.gate:
                trace["gate"] = {"threshold": choice.threshold, "source": choice.threshold_source,
                                 "open": bool(seen["open"][i]), "auroc_text_harmful_vs_benign": choice.gate_auroc}
            out.append(generation(s, r, c, seconds, trace))
        return out

    def _gate(self, hidden: torch.Tensor, eligible: torch.Tensor, seen: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch] factors from the lowest edited block's undefended prefill input (see `gate_factors`);
        records the projections h^l[p]·r̂ for the trace."""
        choice = self.current()
        seen["projection"] = hf_directions.project(hidden[:, choice.position].float(), choice.gate_direction)
        threshold = choice.threshold if self.params.gate else None
        seen["factor"], seen["open"] = gate_factors(seen["projection"], eligible, threshold)
        return seen["factor"]


def gate_factors(projection: torch.Tensor, eligible: torch.Tensor, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(factor, open) per sample: open when there is no gate or the projection is STRICTLY above τ (a
    projection equal to τ is not steered, so at most floor(fpr·n) benign calibration inputs are);
    the factor is 1 for an eligible, open sample and 0 otherwise."""
    is_open = torch.ones_like(projection, dtype=torch.bool) if threshold is None else projection > threshold
    return eligible.double() * is_open.double(), is_open
