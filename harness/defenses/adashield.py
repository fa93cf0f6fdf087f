"""AdaShield: adaptive shield prompting (Wang et al., ECCV 2024, arXiv 2403.09513).

AdaShield-S (`adashield`) adds one defense prompt to every query. AdaShield-A
(`adashield:mode=adaptive,pool=FILE`) retrieves a prompt from a pool trained offline per
scenario (`realign fit`, see adashield_pool.py): the (image, query) pair is CLIP-embedded and the
most similar pool entry's prompt is applied only if its cosine exceeds `beta`; otherwise the
query passes unchanged, which is what keeps benign utility. (Two benign scripts of the public
code compare the cosine with 7.1, so they never apply a prompt; here the comparison is with beta.)

Placement is a parameter: the paper says the prompt is prepended, the public code sends
query + defense + query (`sandwich`, the default). Prompts are in our own wording
(prompts.py); `prompt_file=` loads any other text. Works on any backend: it only edits text.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from pathlib import Path

from harness.contracts.backend import Backend, GenerationParams
from harness.contracts.defense import CalibrationPlan, CalibrationSet, Defense, FittedState, generation, sample_request
from harness.defenses.adashield_pool import Pool, PoolTrainer, TrainConfig, backend_key, embed_entries, pool_fingerprint
from harness.defenses.clip_embed import DEFAULT_CLIP, ClipEmbedder
from harness.defenses.prompts import ADASHIELD_STATIC, load_prompt, place_prompt, prompt_digest
from harness.defenses.vectors import calibration_record
from harness.errors import DataError
from harness.refusal import RefusalMatcher, check_preset, preset_identity
from harness.registry import defense
from harness.schema import Generation, Sample

log = logging.getLogger(__name__)


def same_clip(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two CLIP identities name the same weights: by hub commit where both sides have one,
    else by name and (for local folders) folder fingerprint."""
    if a.get("commit") and b.get("commit"):
        return bool(a["commit"] == b["commit"])
    if a.get("model") != b.get("model"):
        return False
    return not (a.get("folder_hash") and b.get("folder_hash")) or a["folder_hash"] == b["folder_hash"]


@defense("adashield")
class AdaShield(Defense):
    """AdaShield: a defense prompt, static (-S) or retrieved from a trained pool by CLIP similarity (-A)."""

    @dataclass
    class Params:
        mode: Literal["static", "adaptive"] = "static"
        placement: Literal["prepend", "append", "sandwich"] = "sandwich"
        prompt_file: str | None = None  # static prompt; also the starting prompt of pool training
        pool: str | None = None  # adaptive: the pool from `realign fit` (.safetensors or its .json)
        beta: float = 0.7  # adaptive: apply the nearest prompt only if cosine > beta
        clip: str | None = None  # default: the pool's CLIP model, else openai/clip-vit-base-patch32
        clip_device: str | None = None
        allow_overlap: bool = False
        # pool training (`realign fit --defense adashield:mode=adaptive,...`)
        rounds: int = 4
        keep_threshold: float = 0.8
        val_fraction: float = 0.5
        split_seed: int = 0
        keywords: str = "advbench"  # keywords judge preset deciding refusals during training
        keywords_file: str | None = None
        fit_max_new_tokens: int = 128
        defender: Literal["openai", "hf", "target"] = "openai"
        defender_model: str | None = None  # API model name (openai) or folder / hub id (hf)
        defender_base_url: str | None = None
        defender_api_key_env: str = "OPENAI_API_KEY"
        defender_max_new_tokens: int = 512
        defender_temperature: float = 0.0

        def __post_init__(self) -> None:
            if self.mode == "static" and self.pool:
                raise ValueError("pool= applies to mode=adaptive")
            if not -1.0 <= self.beta <= 1.0:
                raise ValueError(f"beta is a cosine threshold in [-1, 1], got {self.beta}")
            if self.rounds < 1:
                raise ValueError("rounds must be at least 1")
            if not 0.0 <= self.keep_threshold <= 1.0:
                raise ValueError("keep_threshold must be in [0, 1]")
            if not 0.0 < self.val_fraction < 1.0:
                raise ValueError("val_fraction must be in (0, 1)")
            if self.defender in ("openai", "hf") and self.defender_model == "":
                raise ValueError("defender_model must not be empty")
            if self.keywords_file is None:
                check_preset(self.keywords)

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self.prompt = load_prompt(params.prompt_file) if params.prompt_file else ADASHIELD_STATIC
        self.pool: Pool | None = None
        self.embedder: ClipEmbedder | None = None

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["prompt_sha256"] = prompt_digest(self.prompt)
        if self.params.mode == "adaptive" and self.params.pool:
            ident["pool_sha256"] = pool_fingerprint(self.params.pool)  # from the files: same before and after prepare()
        return ident

    # ---- adaptive: pool training ---------------------------------------------------------------
    def _defender(self, target: Backend) -> tuple[Backend, bool]:
        """(defender backend, whether we own it and must close it)."""
        p = self.params
        if p.defender == "target":
            return target, False
        if not p.defender_model:
            raise DataError("adashield pool training needs defender_model= (an API model name for "
                            "defender=openai, a folder or hub id for defender=hf), or defender=target")
        if p.defender == "openai":
            from harness.models.openai_api import OpenAIBackend

            backend: Backend = OpenAIBackend(OpenAIBackend.Params(
                model=p.defender_model, base_url=p.defender_base_url, api_key_env=p.defender_api_key_env))
            backend.spec = f"openai:model={p.defender_model}"
            return backend, True
        from harness.models.resolve import load_backend

        return load_backend(p.defender_model), True

    def calibration(self) -> CalibrationPlan | None:
        p = self.params
        if p.mode != "adaptive":
            return None
        return CalibrationPlan(kind="adashield", file=p.pool, allow_overlap=p.allow_overlap, missing=(
            "adashield mode=adaptive needs pool=FILE (train one with `realign fit --defense "
            "adashield:mode=adaptive,defender_model=... --calibration TASK_SPEC --out FILE`)"))

    def fit(self, backend: Backend, sets: dict[str, CalibrationSet], batch_size: int = 8,
            progress: bool = False) -> Pool:
        """Train the prompt pool on harmful samples (--calibration SPEC); scenario = sample category."""
        p = self.params
        if p.mode != "adaptive":
            raise DataError("adashield mode=static has nothing to fit; use --defense adashield:mode=adaptive,...")
        role = next((r for r in ("unsafe", "anchor") if r in sets), None)
        if role is None or not sets[role].samples:
            raise DataError("adashield pool training needs harmful samples: --calibration TASK_SPEC")
        spec, samples = sets[role].spec, sets[role].samples
        refusals = RefusalMatcher.named(p.keywords, p.keywords_file, case_sensitive=True)
        embedder = ClipEmbedder(p.clip or DEFAULT_CLIP, p.clip_device)
        defender, owned = self._defender(backend)
        cfg = TrainConfig(self.prompt, p.placement, p.rounds, p.keep_threshold, p.val_fraction, p.split_seed,
                          p.fit_max_new_tokens, p.defender_max_new_tokens, p.defender_temperature, batch_size)
        trainer = PoolTrainer(backend, defender, refusals.match, cfg, progress)
        try:
            entries, report = trainer.train(samples)
        finally:
            if owned:
                defender.close()
        image, text = embed_entries(embedder, entries, samples)
        manifest = {
            "defense": "adashield",
            "target": backend_key(backend),
            "defender": {"kind": p.defender, **({} if p.defender == "target" else defender.identity())},
            "clip": embedder.identity(),
            "keywords": preset_identity(refusals.preset),
            "settings": {"placement": p.placement, "rounds": p.rounds, "keep_threshold": p.keep_threshold,
                         "val_fraction": p.val_fraction, "split_seed": p.split_seed,
                         "fit_max_new_tokens": p.fit_max_new_tokens, "defender_max_new_tokens": p.defender_max_new_tokens,
                         "defender_temperature": p.defender_temperature,
                         "initial_prompt_sha256": prompt_digest(self.prompt)},
            "calibration": calibration_record(spec, [s.id for s in samples]),
            "model_calls": trainer.calls,
            "scenarios": report,
        }
        log.info("adashield pool: %d entries from %d samples (%s)", len(entries), len(samples), trainer.calls)
        return Pool(entries, image, text, manifest)

    # ---- adaptive: loading -----------------------------------------------------------------------
    def load_state(self, path: str | Path) -> FittedState:
        return Pool.load(path)

    def use_state(self, state: FittedState, backend: Backend) -> None:
        """Install the pool with the CLIP model it was embedded with (another CLIP would make the
        similarities meaningless)."""
        assert isinstance(state, Pool)
        p = self.params
        clip_ident = state.manifest.get("clip") or {}
        name = p.clip or clip_ident.get("model") or DEFAULT_CLIP
        embedder = ClipEmbedder(name, p.clip_device)
        mine = embedder.identity()
        if clip_ident and not same_clip(clip_ident, mine):
            raise DataError(f"adashield pool {p.pool} was embedded with CLIP {clip_ident}, not {mine}: "
                            "similarities would be meaningless; use the pool's CLIP model (leave clip= unset)")
        self.pool, self.embedder = state, embedder

    # ---- generation ----------------------------------------------------------------------------
    def choose(self, samples: list[Sample]) -> list[dict[str, Any]]:
        """Per sample: the defense prompt to apply (or None) and why, as recorded in the trace."""
        if self.params.mode == "static":
            return [{"defense_prompt": self.prompt, "applied": True} for _ in samples]
        if self.pool is None or self.embedder is None:
            raise RuntimeError("adashield: prepare() was not called before generate()")
        image, text, has_image = self.embedder.embed_pairs([s.image for s in samples], [s.text for s in samples])  # type: ignore[misc]
        index, sims = self.pool.nearest(image, text, has_image)
        out = []
        for i, sim in zip(index, sims):
            applied = i >= 0 and sim > self.params.beta
            entry = self.pool.entries[i] if i >= 0 else None
            out.append({
                "defense_prompt": entry.prompt if applied and entry else None,
                "applied": applied,
                "similarity": round(sim, 6) if i >= 0 else None,
                "beta": self.params.beta,
                "pool_index": i if i >= 0 else None,
                "scenario": entry.scenario if entry else None,
            })
        return out

    def generate(self, backend: Backend, samples: list[Sample], params: GenerationParams) -> list[Generation]:
        start = time.perf_counter()
        choices = self.choose(samples)
        retrieval = (time.perf_counter() - start) / max(len(samples), 1)
        requests = [
            sample_request(s, place_prompt(s.text, c["defense_prompt"], self.params.placement) if c["applied"] else s.text)
            for s, c in zip(samples, choices)
        ]
        completions = backend.generate(requests, params)
        per_sample = (time.perf_counter() - start) / max(len(samples), 1)
        out = []
        for s, r, c, choice in zip(samples, requests, completions, choices):
            trace = {"model_calls": 1, "mode": self.params.mode, "placement": self.params.placement, **choice}
            if choice["defense_prompt"] is not None:
                trace["prompt_sha256"] = prompt_digest(choice["defense_prompt"])
            extra = {"retrieval_seconds": retrieval} if self.params.mode == "adaptive" else {}
            out.append(generation(s, r, c, per_sample, trace, **extra))
        return out
