"""Projected gradient descent in 8-bit pixel units, batched, checkpointed and resumable.

Why integer units: the papers' budgets and steps are multiples of 1/255 (eps 16/255, step 1/255),
and an image is evaluated as an 8-bit PNG. Keeping the iterate as integers 0..255 makes the saved
image the optimised image bit for bit (no rounding after the fact can leave the budget), and the
projection onto [u0 - eps, u0 + eps] and [0, 255] is exact. The forward sees x = u / 255.

Why the generator state is checkpointed: the random start and any per-step sampling (a universal
attack draws its target sentences every step) come from one torch.Generator per item, seeded from
the run seed and the item; saving its state with the image makes a resumed optimisation equal an
uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from harness.whitebox import teacher
from harness.whitebox.objectives import Plain, placeholder
from harness.whitebox.store import Checkpoint, Entry

#: (text, target, kind) rows of one item at one step, drawn with the item's generator.
RowsFn = Callable[[int, torch.Generator], list[tuple[str, str, teacher.Kind]]]
HISTORY_EVERY = 10  # the loss history keeps one value every this many steps (and the last)


@dataclass(frozen=True)
class Budget:
    eps: int  # L-inf radius in 8-bit units (255: unconstrained)
    step: int  # step size in 8-bit units
    steps: int
    random_start: bool = True
    checkpoint_every: int = 10
    refusal_weight: float = 1.0

    def record(self) -> dict[str, Any]:
        return {"eps": self.eps, "eps_float": round(self.eps / 255, 6), "step": self.step, "steps": self.steps,
                "random_start": self.random_start, "unconstrained": self.eps >= 255}


@dataclass
class Item:
    """One image to optimise: its cache entry, clean image [3, H, W] int16, text, rows and seed."""

    entry: Entry
    u0: torch.Tensor
    text: str
    rows: RowsFn
    seed: int
    # filled while optimising
    u: torch.Tensor | None = None
    step: int = 0
    gen: torch.Generator = field(default_factory=torch.Generator)
    history: list[float] = field(default_factory=list)
    resumed_from: int = 0


def start(item: Item, budget: Budget) -> None:
    """Resume from the item's checkpoint, or draw the random start with its seeded generator."""
    ck = item.entry.load_checkpoint()
    if ck is not None and torch.equal(ck.u0, item.u0):
        item.u, item.step, item.history, item.resumed_from = ck.u.clone(), ck.step, list(ck.history), ck.step
        item.gen.set_state(ck.rng)
        return
    item.gen.manual_seed(item.seed)
    u0 = item.u0.to(torch.int16)
    if not budget.random_start:
        item.u = u0.clone()
    elif budget.eps >= 255:  # unconstrained: uniform noise, as Qi et al.
        item.u = torch.randint(0, 256, u0.shape, generator=item.gen, dtype=torch.int16)
    else:
        noise = torch.randint(-budget.eps, budget.eps + 1, u0.shape, generator=item.gen, dtype=torch.int16)
        item.u = (u0 + noise).clamp(0, 255)


def project(u: torch.Tensor, u0: torch.Tensor, eps: int) -> torch.Tensor:
    return torch.minimum(torch.maximum(u, u0 - eps), u0 + eps).clamp(0, 255)


def optimise(objective: Plain, items: list[Item], budget: Budget, progress: bool = False,
             desc: str = "white-box") -> list[dict[str, Any]]:
    """Optimise every item and return their records in order: one batch per image geometry (a
    Qwen2-VL image keeps its own aspect; every other family has one), the objective's pipeline
    set to that geometry meanwhile."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((int(it.u0.shape[-2]), int(it.u0.shape[-1])), []).append(i)
    records: list[dict[str, Any]] = [{} for _ in items]
    default = objective.pipeline
    try:
        for size, idx in groups.items():
            objective.pipeline = default.at(size)
            for i, record in zip(idx, _optimise_batch(objective, [items[i] for i in idx], budget, progress, desc)):
                records[i] = record
    finally:
        objective.pipeline = default
    return records


def _optimise_batch(objective: Plain, items: list[Item], budget: Budget, progress: bool = False,
                    desc: str = "white-box") -> list[dict[str, Any]]:
    """Optimise items of one geometry (all in one batch of rows per step); return their records. Items
    resume from their checkpoints; each is saved (and re-verified) as soon as it reaches `budget.steps`."""
    began = time.perf_counter()
    for item in items:
        start(item, budget)
    texts = [it.text for it in items]
    u = torch.stack([it.u for it in items])  # type: ignore[misc]
    u0 = torch.stack([it.u0.to(torch.int16) for it in items])
    objective.seed_items([it.seed for it in items])
    objective.begin(texts, u)
    for i, it in enumerate(items):
        ck = it.entry.load_checkpoint() if it.resumed_from else None
        objective.restore(i, ck.objective if ck else {})
    image = placeholder(objective.pipeline)
    device, dtype = objective.model.device, torch.float32
    remaining = sum(budget.steps - it.step for it in items)
    bar = tqdm(total=remaining, desc=desc, disable=not progress, file=sys.stderr, unit="step")
    records: list[dict[str, Any] | None] = [None] * len(items)
    for i, it in enumerate(items):
        if it.step >= budget.steps:
            records[i] = _finish(it, u[i], budget, began, objective)
    while True:
        active = [i for i, it in enumerate(items) if it.step < budget.steps]
        if not active:
            break
        objective.refresh({i: items[i].step for i in active}, texts, u)
        rows = [teacher.Row(i, objective.text(text), target, kind)
                for i in active for text, target, kind in items[i].rows(items[i].step, items[i].gen)]
        batch = teacher.build(objective.backend, rows, image)
        x = (u.to(device, dtype) / 255).requires_grad_(True)
        with torch.enable_grad():
            row_loss, _ = objective.losses(x, batch)
            per_item = _per_item(row_loss, rows, len(items), budget.refusal_weight)
            (grad,) = torch.autograd.grad(per_item.sum(), x)
        sign = grad.sign().to("cpu", torch.int16)
        for i in active:
            it = items[i]
            u[i] = project(u[i] - budget.step * sign[i], u0[i], budget.eps)
            it.step += 1
            if it.step % HISTORY_EVERY == 0 or it.step == budget.steps or it.step == 1:
                it.history.append(round(float(per_item[i].detach()), 6))
            if it.step % budget.checkpoint_every == 0 or it.step == budget.steps:
                it.entry.save_checkpoint(Checkpoint(it.step, u[i].clone(), u0[i].clone(), it.gen.get_state(),
                                                    it.history, objective.item_state(i)))
            if it.step == budget.steps:
                records[i] = _finish(it, u[i], budget, began, objective)
        bar.update(len(active))
        bar.set_postfix(loss=f"{float(per_item[active].detach().mean()):.3f}")
    bar.close()
    return [r for r in records if r is not None]


def _per_item(row_loss: torch.Tensor, rows: list[teacher.Row], n: int, refusal_weight: float) -> torch.Tensor:
    """[n] per image: the mean of its target rows plus refusal_weight times the mean of its refusal rows."""
    weights = torch.zeros(len(rows), dtype=row_loss.dtype, device=row_loss.device)
    for kind, w in (("target", 1.0), ("refusal", refusal_weight)):
        for i in range(n):
            idx = [j for j, r in enumerate(rows) if r.owner == i and r.kind == kind]
            if idx:
                weights[idx] = w / len(idx)
    owner = torch.tensor([r.owner for r in rows], device=row_loss.device)
    return torch.zeros(n, dtype=row_loss.dtype, device=row_loss.device).index_add(0, owner, weights * row_loss)


def _finish(item: Item, u: torch.Tensor, budget: Budget, began: float, objective: Plain) -> dict[str, Any]:
    record = {**budget.record(), "final_loss": item.history[-1] if item.history else None,
              "loss_history": item.history, "resumed_from_step": item.resumed_from,
              "steps_run": budget.steps - item.resumed_from, "batch_seconds": round(time.perf_counter() - began, 3), "objective": objective.identity(),
              "linf": int((u - item.u0.to(torch.int16)).abs().max())}
    return item.entry.save_result(u, item.u0.to(torch.int16), budget.eps, record)
