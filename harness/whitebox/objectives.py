"""The loss an attack minimises, computed on the forward pass the evaluated defense would run.

One class per differentiable defense (see `status`); each reuses the defense object's own fitted
state and choices (its layers, positions, vectors, band and threshold, prompt), so the adaptive
attacker optimises against exactly what the run evaluates:
  - `Plain`: the undefended model (`through=none`: the transfer regime's source);
  - `Steered`: CMRM. Its vectors come from `defense.steer` (a blank image and the text, never the
    attacked pixels), added as constants inside the graph;
  - `ShiftDCLoss`: the image-side states h(q, img) are read WITH their gradient in an unsteered
    forward, the caption side h(q + caption) is a constant refreshed every `refresh` steps (BPDA);
  - `RefusalDirLoss`: alpha*r at the block inputs (actadd); the gate is evaluated, not differentiated;
  - `HiddenDetectLoss`: the target loss on the unflagged path plus weight*relu(S - tau + margin);
  - `Prompted`: AdaShield-S, its prompt placed in the text;
  - `JailGuardEOT`: the target loss averaged over the unmutated image and `eot` copies under fresh
    draws of JailGuard's image mutations, in torch (`eot`);
  - `QGuardLoss` (guard=self): the target loss on the unflagged path plus
    weight*relu(risk - tau + margin), P(yes) from the target's own logits (`qguard_risk`).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from harness.contracts.backend import user_request
from harness.defenses.hiddendetect_state import band_score, layer_cosines
from harness.defenses.prompts import place_prompt
from harness.defenses.qguard import FRAME
from harness.defenses.qguard_state import SELF
from harness.defenses.refusal_dir import gate_factors
from harness.defenses.shiftdc import TEXT_WITH_CAPTION
from harness.errors import CapabilityError
from harness.models import hf_directions
from harness.models.hf_scoring import final_norm
from harness.schema import Sample
from harness.whitebox import eot, hooks, teacher
from harness.whitebox.pixels import Pipeline, to_image
from harness.whitebox.qguard_risk import TorchRisk
from harness.whitebox.status import status_for, status_of


class Plain:
    """The undefended forward; subclasses edit the text, add hooks or add loss terms."""

    name = "none"

    def __init__(self, backend: Any, defense: Any, settings: dict[str, Any]) -> None:
        self.backend, self.defense, self.settings = backend, defense, settings
        self.pipeline = Pipeline.for_backend(backend)
        self.model = backend.model
        self._state: dict[int, dict[str, Any]] = {}
        self.item_seeds: list[int] = []

    def seed_items(self, seeds: list[int]) -> None:
        """Each image's own seed (pgd.optimise sets them before `begin`): per-step draws of an
        objective come from it and the step, so a resumed optimisation draws the same."""
        self.item_seeds = list(seeds)

    def item_seed(self, index: int) -> int:
        return self.item_seeds[index] if index < len(self.item_seeds) else index

    # ---- what subclasses override -----------------------------------------------------------
    def text(self, text: str) -> str:
        """The user text the defended model receives for `text`."""
        return text

    def begin(self, texts: list[str], u: torch.Tensor) -> None:
        """Called once per batch before its first step: constants of the pixels (texts per image)."""

    def refresh(self, steps: dict[int, int], texts: list[str], u: torch.Tensor) -> None:
        """Called before every step with each active image's step and all current 8-bit images
        (BPDA refreshes)."""

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logits [R, T, V], extra loss per row [R])."""
        return teacher.forward(self.model, batch, pixel_values), torch.zeros(len(batch.rows), device=pixel_values.device)

    # ---- shared -------------------------------------------------------------------------------
    def losses(self, x: torch.Tensor, batch: teacher.TeacherBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row loss [R] with its graph to x, per-row extra term [R]): x [images, 3, H, W] in [0, 1]."""
        pixel_values = self.pipeline(x)
        logits, extra = self.logits(batch, pixel_values)
        return teacher.row_losses(logits, batch) + extra, extra

    def item_state(self, index: int) -> dict[str, Any]:
        """JSON-able state of image `index` that a checkpoint must keep for an exact resume (the
        caption held fixed since its last refresh)."""
        return dict(self._state.get(index, {}))

    def restore(self, index: int, state: dict[str, Any]) -> None:
        if state:
            self._state[index] = dict(state)

    def identity(self) -> dict[str, Any]:
        status, how = status_of(self.name) if self.defense is None else status_for(self.defense.spec)
        return {"through": None if self.defense is None else self.defense.spec, "status": status, "how": how,
                "processor": self.pipeline.processor, "size": list(self.pipeline.size)}

    def samples(self, texts: list[str], u: torch.Tensor) -> list[Sample]:
        return [Sample(id=f"whitebox/{i}", text=t, image=to_image(u[i])) for i, t in enumerate(texts)]


class Steered(Plain):
    """CMRM: the defense's own vectors, constants of the pixels, added to its layers' outputs."""

    name = "cmrm"

    def begin(self, texts: list[str], u: torch.Tensor) -> None:
        self.layers = self.defense.layers(self.backend)
        steer = self.defense.steer(self.backend, self.samples(texts, u), self.layers)
        self.vectors = steer.vectors.to(self.model.device)  # [images, k, H]

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = {layer: self.vectors[batch.owner, i] for i, layer in enumerate(self.layers)}
        with hooks.add_to_outputs(self.model, vectors, batch.weights(self.defense.positions())):
            return super().logits(batch, pixel_values)


class ShiftDCLoss(Plain):
    """ShiftDC: c = alpha * (m.s / s.s) s with m = h(q, img) - h(q + caption), subtracted at its layers."""

    name = "shiftdc"

    def begin(self, texts: list[str], u: torch.Tensor) -> None:
        self.layers = self.defense.layers(self.backend)
        self.direction = self.defense.fitted().vectors[self.layers].to(self.model.device)  # [k, H]
        self.texts = texts

    def refresh(self, steps: dict[int, int], texts: list[str], u: torch.Tensor) -> None:
        """Re-caption the images whose caption is missing or `refresh` steps old, in one batch."""
        every = max(int(self.settings.get("refresh", 10)), 1)
        due = [i for i, step in steps.items() if i not in self._state or step % every == 0]
        if due:
            done = self.defense.captions(self.backend, [self.samples(texts, u)[i] for i in due])
            for i, c in zip(due, done):
                self._state[i] = {"caption": c.text.strip(), "at_step": steps[i]}

    def _caption_states(self, owners: list[int]) -> torch.Tensor:
        """[R, k, H] constant states of `text + caption` per row (cached while the captions stay)."""
        texts = [TEXT_WITH_CAPTION.format(query=self.texts[i], caption=self._state[i]["caption"]) for i in owners]
        if getattr(self, "_cached", (None,))[0] != texts:
            states = self.backend.last_token_states([user_request(t) for t in texts], self.layers)
            self._cached = (texts, states.to(self.model.device))
        return self._cached[1]

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with hooks.capture_outputs(self.model, self.layers, batch.prompt_len - 1, stop=True) as seen:
            try:
                teacher.forward(self.model, batch, pixel_values)
            except hooks.StopForward:
                pass
        image_side = torch.stack([seen[layer] for layer in self.layers], 1)  # [R, k, H], with graph
        shift = image_side - self._caption_states(batch.owner.tolist()).to(image_side.dtype)
        s = self.direction.to(image_side.dtype)
        coef = (shift * s).sum(-1) / (s * s).sum(-1).clamp_min(1e-12)  # [R, k]
        correction = self.defense.params.alpha * coef[..., None] * s
        vectors = {layer: -correction[:, i] for i, layer in enumerate(self.layers)}
        with hooks.add_to_outputs(self.model, vectors, batch.weights(self.defense.positions())):
            return super().logits(batch, pixel_values)


class RefusalDirLoss(Plain):
    """Refusal-direction steering (actadd): alpha*r at the chosen block inputs and positions."""

    name = "refusal_dir"

    def __init__(self, backend: Any, defense: Any, settings: dict[str, Any]) -> None:
        super().__init__(backend, defense, settings)
        if defense.params.mode != "actadd":
            raise CapabilityError("refusal_dir mode=ablate removes refusal (an audit, not a defense); "
                                  "white-box attacks go through mode=actadd only")

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        choice, p = self.defense.current(), self.defense.params
        rows = len(batch.rows)
        vectors = {l: (p.alpha * r).to(self.model.device).unsqueeze(0).expand(rows, -1) for l, r in choice.directions.items()}
        position = batch.prompt_len + choice.position  # counted from the prompt end
        threshold = choice.threshold if p.gate else None

        def gate(hidden: torch.Tensor) -> torch.Tensor:
            projection = hf_directions.project(hidden[:, position].detach().float(), choice.gate_direction.to(hidden.device))
            return gate_factors(projection, torch.ones(rows, dtype=torch.float32, device=hidden.device), threshold)[0]

        with hooks.add_to_inputs(self.model, vectors, batch.weights(frozenset(p.positions)), gate=gate):
            return super().logits(batch, pixel_values)


class HiddenDetectLoss(Plain):
    """HiddenDetect: the answer path is the undefended model's, and its score must stay under tau."""

    name = "hiddendetect"

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decision = self.defense.current(self.backend)
        layers = list(range(int(self.backend.decoder_size().num_layers)))
        with hooks.capture_outputs(self.model, layers, batch.prompt_len - 1) as seen:
            logits, _ = super().logits(batch, pixel_values)
        states = torch.stack([seen[layer] for layer in layers], 1)  # [R, L, H]
        lens = self.model.get_output_embeddings()(final_norm(self.model)(states))
        score = band_score(layer_cosines(lens, self.defense.token_ids(self.backend)), decision.band)
        weight, margin = float(self.settings.get("hd_weight", 10.0)), float(self.settings.get("hd_margin", 0.0))
        return logits, weight * torch.relu(score - decision.tau + margin)


class Prompted(Plain):
    """AdaShield-S: the defense prompt placed in the text, as its generate does."""

    name = "adashield"

    def __init__(self, backend: Any, defense: Any, settings: dict[str, Any]) -> None:
        super().__init__(backend, defense, settings)
        if defense.params.mode != "static":
            raise CapabilityError("adashield mode=adaptive is transfer-only for white-box attacks")

    def text(self, text: str) -> str:
        return place_prompt(text, self.defense.prompt, self.defense.params.placement)


class JailGuardEOT(Plain):
    """JailGuard by expectation over transformations: each row's loss is the mean over the unmutated
    image (the input JailGuard answers and returns) and `eot` copies under fresh draws of its image
    mutations, so every variant is pushed to the same target answer (no divergence to flag)."""

    name = "jailguard"

    def __init__(self, backend: Any, defense: Any, settings: dict[str, Any]) -> None:
        super().__init__(backend, defense, settings)
        if defense.params.mode != "image":
            raise CapabilityError("jailguard mode=text|both is transfer-only for white-box attacks "
                                  "(the EOT loss covers its image mutations only)")
        self.k = int(settings.get("eot", 8))
        self.draws: dict[int, list[dict[str, Any]]] = {}

    def refresh(self, steps: dict[int, int], texts: list[str], u: torch.Tensor) -> None:
        self.draws = {i: eot.draws(self.item_seed(i), step, self.k) for i, step in steps.items()}

    def copies(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[x, then copy c of every image under its c-th draw] (an image without draws stays as is)."""
        return [x] + [torch.stack([eot.apply(x[i], self.draws[i][c]) if i in self.draws else x[i]
                                   for i in range(len(x))]) for c in range(self.k)]

    def losses(self, x: torch.Tensor, batch: teacher.TeacherBatch) -> tuple[torch.Tensor, torch.Tensor]:
        copies = self.copies(x)
        tiled = teacher.tile(batch, len(copies), len(x))
        logits, extra = self.logits(tiled, self.pipeline(torch.cat(copies)))
        per_copy = (teacher.row_losses(logits, tiled) + extra).view(len(copies), -1)
        return per_copy.mean(0), extra.view(len(copies), -1).mean(0)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "eot": self.k, "eot_copies": "the unmutated image + eot mutated copies"}


class QGuardLoss(Plain):
    """QGuard asked by the target itself: the answer path is the undefended model's, and the risk
    from the guard questions' P(yes) (the target's next-token logits) must stay under tau.

    Each question is one more forward per image and step (35 with the bundled set), which dominates
    a step. `qg_questions=k` asks only k of them per step, in turn (step s asks questions s*k .. s*k+k-1,
    cyclically), and holds every other one at the P(yes) it last had (a constant): the risk is then
    exact for the pixels each value was read at, and the gradient flows through the k asked now.
    The first step of an image asks all of them; the held values are part of the checkpoint."""

    name = "qguard"

    def __init__(self, backend: Any, defense: Any, settings: dict[str, Any]) -> None:
        super().__init__(backend, defense, settings)
        if defense.guard_spec != SELF:
            raise CapabilityError(f"qguard with guard={defense.guard_spec} is transfer-only for white-box attacks "
                                  "(only guard=self, the target as its own guard, is differentiated)")
        p = defense.params
        self.flat = [q for _, q in defense.questions.flat()]
        self.risk = TorchRisk(defense.questions.groups, p.group_coupling, p.question_coupling, p.damping)
        yes, no = defense.variants(backend)
        ids = [int(i) for i in backend.token_ids(yes + no)]
        self.yes_ids, self.no_ids = ids[: len(yes)], ids[len(yes) :]
        self.weight, self.margin = float(settings.get("qg_weight", 1000.0)), float(settings.get("qg_margin", 0.0))
        per_step = int(settings.get("qg_questions", 0))
        self.per_step = per_step if 0 < per_step < len(self.flat) else len(self.flat)
        self.steps: dict[int, int] = {}
        self._asked: dict[tuple[tuple[int, tuple[int, ...]], ...], teacher.TeacherBatch] = {}

    def begin(self, texts: list[str], u: torch.Tensor) -> None:
        self.texts, self._asked, self.steps = texts, {}, {}
        self._state = {}  # held P(yes) belong to this batch's images (a resumed one restores its own next)

    def refresh(self, steps: dict[int, int], texts: list[str], u: torch.Tensor) -> None:
        self.steps = dict(steps)

    def asked(self, image: int) -> tuple[int, ...]:
        """The questions asked about `image` this step (all of them without held values)."""
        q = len(self.flat)
        if self.per_step == q or "p_yes" not in self._state.get(image, {}):
            return tuple(range(q))
        first = self.steps.get(image, 0) * self.per_step
        return tuple((first + j) % q for j in range(self.per_step))

    def questions(self, plan: tuple[tuple[int, tuple[int, ...]], ...]) -> teacher.TeacherBatch:
        """The guard questions `plan` asks ((image, question indices) pairs), worded as QGuard asks them."""
        if plan not in self._asked:
            rows = [teacher.Row(i, FRAME.format(question=self.flat[q], prompt=self.texts[i]), (self.yes_ids[0],))
                    for i, qs in plan for q in qs]
            if len(self._asked) > 64:
                self._asked.clear()
            self._asked[plan] = teacher.build(self.backend, rows, placeholder(self.pipeline))
        return self._asked[plan]

    def p_yes(self, owners: tuple[int, ...], pixel_values: torch.Tensor) -> torch.Tensor:
        """[owners, questions] P(yes) = softmax(logsumexp(yes variants), logsumexp(no variants))[0]: read
        now for the questions asked this step, held for the others."""
        plan = tuple((i, self.asked(i)) for i in owners)
        logits = teacher.forward(self.model, self.questions(plan), pixel_values)[:, 0]
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        fresh = torch.sigmoid(torch.logsumexp(logp[:, self.yes_ids], -1) - torch.logsumexp(logp[:, self.no_ids], -1))
        out, at = [], 0
        for i, qs in plan:
            held = torch.tensor(self._state.get(i, {}).get("p_yes", [0.0] * len(self.flat)), dtype=fresh.dtype,
                                device=fresh.device)
            row = held.index_put((torch.tensor(qs, device=fresh.device),), fresh[at : at + len(qs)])
            at += len(qs)
            if self.per_step < len(self.flat):
                self._state[i] = {"p_yes": row.detach().tolist()}
            out.append(row)
        return torch.stack(out)

    def logits(self, batch: teacher.TeacherBatch, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = super().logits(batch, pixel_values)
        owners = tuple(sorted(set(batch.owner.tolist())))
        risk = self.risk(self.p_yes(owners, pixel_values))  # [owners]
        where = torch.tensor([owners.index(int(o)) for o in batch.owner.tolist()], device=risk.device)
        penalty = self.weight * torch.relu(risk[where] - self.defense.current_tau() + self.margin)
        return logits, penalty.to(torch.promote_types(logits.dtype, torch.float32))

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "qg_questions": self.per_step, "questions": len(self.flat)}


OBJECTIVES: dict[str, type[Plain]] = {c.name: c for c in (Plain, Steered, ShiftDCLoss, RefusalDirLoss,
                                                         HiddenDetectLoss, Prompted, JailGuardEOT, QGuardLoss)}


def objective_for(backend: Any, defense: Any | None, settings: dict[str, Any]) -> Plain:
    """The objective for `defense` (None: the undefended model); refuses a transfer-only defense."""
    if not callable(getattr(backend, "encode", None)) or getattr(backend, "model", None) is None:
        raise CapabilityError(f"white-box attacks need an HF model's gradients; backend {getattr(backend, 'spec', '?')!r} "
                              "has none")
    name = "none" if defense is None else getattr(type(defense), "registered_name", type(defense).__name__)
    if name not in OBJECTIVES:
        status, why = status_of(name)
        raise CapabilityError(f"defense {name!r} is {status} for white-box attacks ({why})")
    return OBJECTIVES[name](backend, defense, settings)


def placeholder(pipeline: Pipeline) -> Image.Image:
    """A grey image at the optimisation size: the prompt is encoded once with it, its pixels replaced."""
    return Image.new("RGB", (pipeline.size[1], pipeline.size[0]), (128, 128, 128))
