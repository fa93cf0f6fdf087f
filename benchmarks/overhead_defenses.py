"""The defenses the defense-overhead benchmark times, built per input kind with their decision path forced.

Random weights make no meaningful decision, so the timings would measure whichever path chance
picks. Each defense is therefore built, or patched while it runs, so that benign inputs take its
pass path and harmful inputs its flagged path, at the cost that path really has:

- `ecso`: the self-check verdict (`says_yes`) is patched (benign: safe, harmful: unsafe);
- `hiddendetect`: explicit `layers=` and `threshold=` (no calibration); τ = 1e9 on benign inputs
  (no score exceeds it: every request is answered) and -1e9 on harmful ones (every request is
  refused after the scoring prefill);
- `jailguard`: N = 8 variants plus the original (N + 1 model calls per sample) whatever the
  verdict, so the default spec with its fixed θ (no calibration) times both paths;
- `guard`: a guard of the target's own size (a copy of the target's folder, or of the in-memory
  --gpu model saved to one, whose processor carries the guard chat template), stage=input; the
  reply's first line (`first_line` in harness/defenses/guard.py) is patched to `safe` / `unsafe`;
- `protector`: detector and detoxifier built at the target's language-model size with the
  benchmark tokenizer; benign: threshold=0 (p_safe < 0 never holds); harmful: threshold=1 and the
  detector's scores (computed as usual) replaced by 0, since its Params allow no threshold above 1;
  the rewrite is capped at the answer's length (`detox_max_new_tokens`);
- `qguard`: guard=self (the target answers the 35 guard questions), τ = 1e9 / -1e9;
- `coca`: the default (two streams of the batch per token; no decision to force);
- `refusal_dir`: a direction fitted at an explicit layer (the middle one) and position (-1), without
  the refusal-score filter (random weights refuse nothing), always added (no gate);
- `eta`: a reward model at the target's size and a tiny CLIP (CLIP-L/336 is small beside a 7B
  target; the tiny one understates it); benign: rm_threshold=-1e9 (the first answer is kept after
  one CLIP and one reward pass); harmful: rm_threshold=1e9 and clip_threshold=-1 (both gates say
  unsafe: the prefix and sentence-level best-of-5 up to the answer's length).

Specs that differ by input kind are built per kind; a defense is built once per spec (cached), so
fitted ones (CMRM dataset shifts, ShiftDC direction) are fitted once and loaded helpers kept.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.contracts.backend import Backend
from harness.contracts.defense import CalibrationSet, Defense
from harness.defenses import ecso as ecso_module
from harness.defenses import guard as guard_module
from harness.defenses.protector_models import Helper
from harness.registry import defenses
from harness.schema import Sample
from harness.tiny.build import TEXT
from harness.tiny.clip import build_tiny_clip
from harness.tiny.llamaguard import guard_chat_template
from harness.tiny.protector import build_tiny_detector, build_tiny_detoxifier
from harness.tiny.reward import build_tiny_reward_model
from tasks.demo import BENIGN_REQUESTS, HARMFUL_REQUESTS

ROWS = ("none", "cmrm dataset", "cmrm sample", "shiftdc", "adashield", "ecso",
        "hiddendetect", "jailguard", "guard", "protector", "qguard", "coca", "refusal_dir", "eta")
#: Rows the --gpu benchmark cannot time: the helpers are written as float32 folders by the tiny
#: builders, and two 7B ones (about 28 GB each) do not fit the GPU machine's disk beside the guard.
CPU_ONLY = ("protector", "eta")


def calibration() -> dict[str, list[Sample]]:
    harmful = [Sample(f"u{i}", t) for i, t in enumerate(HARMFUL_REQUESTS)]
    benign = [Sample(f"s{i}", t) for i, t in enumerate(BENIGN_REQUESTS)]
    return {"anchor": benign, "unsafe": harmful, "safe": benign}


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def forced_paths(unsafe: bool) -> Iterator[None]:
    """Every patched decision at once (see the module docstring): harmful inputs are flagged by
    ECSO's self-check, the guard and the protector's detector; benign ones pass."""
    original_p_safe = Helper.p_safe

    def flagged_p_safe(self: Helper, texts: list[str], batch_size: int) -> list[float]:
        return [0.0 for _ in original_p_safe(self, texts, batch_size)]  # the detector still runs

    with ExitStack() as stack:
        stack.enter_context(patched(ecso_module, "says_yes", lambda reply: unsafe))
        stack.enter_context(patched(guard_module, "first_line", lambda reply: "unsafe" if unsafe else "safe"))
        if unsafe:
            stack.enter_context(patched(Helper, "p_safe", flagged_p_safe))
        yield


def text_sizes(backend: Backend) -> dict[str, int]:
    """The target's language-model sizes, under the tiny builders' keys (TEXT)."""
    config = backend.model.config.get_text_config()  # type: ignore[attr-defined]
    return {k: int(getattr(config, k)) for k in TEXT}


def placement(backend: Backend) -> tuple[str, str]:
    """(device, dtype) of the target, so helpers run where and as it does."""
    model = backend.model  # type: ignore[attr-defined]
    return str(model.device), str(model.dtype).removeprefix("torch.")


def guard_folder(backend: Backend) -> Path:
    """A guard of the target's architecture and size: its folder copied (CPU), or the in-memory
    model saved (--gpu; about 14 GB for the 7B), with the guard chat template on its processor."""
    from transformers import AutoProcessor

    out = Path(tempfile.mkdtemp(prefix="realign-bench-guard-")) / "guard"
    source = Path(backend.params.pretrained)  # type: ignore[attr-defined]
    if source.is_dir():
        shutil.copytree(source, out)
    else:
        backend.model.save_pretrained(out)  # type: ignore[attr-defined]
        backend.processor.save_pretrained(out)  # type: ignore[attr-defined]
    processor = AutoProcessor.from_pretrained(out)
    processor.chat_template = guard_chat_template(getattr(processor, "image_token", None) or "<image>")
    processor.save_pretrained(out)
    return out


class OverheadDefenses:
    """Builds the benchmark's defenses for an input kind; one instance per spec for the whole run."""

    def __init__(self, backend: Backend, caption_tokens: int, new_tokens: int,
                 helper_tokenizer: dict[str, Any] | None = None) -> None:
        self.backend, self.caption_tokens, self.new_tokens = backend, caption_tokens, new_tokens
        self.helper_tokenizer = helper_tokenizer  # `train_tokenizer` arguments for the protector's helpers
        self.calib = calibration()
        self.built: dict[str, Defense] = {}
        self.folders: dict[str, Path] = {}

    def build(self, rows: tuple[str, ...], kind: str) -> dict[str, Defense]:
        """The defenses of `rows` (names from ROWS) for `kind` ("benign" or "harmful")."""
        return {name: self._get(*self._spec(name, kind == "harmful")) for name in rows}

    def _spec(self, name: str, harmful: bool) -> tuple[str, Callable[[str], Defense]]:
        """(spec, how to build it) for a row and input kind."""
        tau = "-1e9" if harmful else "1e9"  # every score above it / none
        device, dtype = placement(self.backend)
        plain = defenses.build
        if name == "cmrm dataset":
            return "cmrm:level=dataset", lambda s: self._fitted(s, ("anchor",))
        if name == "shiftdc":
            return f"shiftdc:caption_max_new_tokens={self.caption_tokens}", lambda s: self._fitted(s, ("unsafe", "safe"))
        if name == "hiddendetect":
            return f"hiddendetect:layers=half,threshold={tau}", plain
        if name == "jailguard":
            return "jailguard:n=8", plain
        if name == "guard":
            return (f"guard:guard={self._folder('guard')},stage=input,guard_device={device},guard_dtype={dtype}",
                    plain)
        if name == "protector":
            spec = (f"protector:detector={self._folder('detector')},detoxifier={self._folder('detoxifier')},"
                    f"threshold={1 if harmful else 0},detox_max_new_tokens={self.new_tokens},device={device},"
                    f"dtype={dtype}")
            return spec, plain
        if name == "qguard":
            # The target answers its own 35 guard questions (35 prefills per input, batched with
            # the batch's other inputs); the public code's separate 4B guard (InternVL2.5-4B) would
            # cost differently: a smaller model, but loaded beside the target.
            return f"qguard:guard=self,threshold={tau}", plain
        if name == "refusal_dir":
            layer = text_sizes(self.backend)["num_hidden_layers"] // 2
            return (f"refusal_dir:layer={layer},position=-1,filter=false,apply_to=all",
                    lambda s: self._fitted(s, ("unsafe", "safe")))
        if name == "eta":
            gates = "rm_threshold=1e9,clip_threshold=-1" if harmful else "rm_threshold=-1e9"
            return (f"eta:clip={self._folder('clip')},reward_model={self._folder('reward')},rm_trust_remote_code=false,"
                    f"{gates},aligned_max_new_tokens={self.new_tokens},device={device},dtype={dtype}", plain)
        specs = {"none": "none", "cmrm sample": "cmrm:level=sample", "adashield": "adashield", "coca": "coca",
                 "ecso": f"ecso:caption_max_new_tokens={self.caption_tokens}"}
        return specs[name], plain

    def _get(self, spec: str, make: Callable[[str], Defense]) -> Defense:
        if spec not in self.built:
            self.built[spec] = make(spec)
        return self.built[spec]

    def _fitted(self, spec: str, roles: tuple[str, ...]) -> Defense:
        d = defenses.build(spec)
        sets = {role: CalibrationSet("bench", self.calib[role]) for role in roles}
        d.use_state(d.fit(self.backend, sets, batch_size=8), self.backend)
        return d

    def _folder(self, role: str) -> Path:
        """The guard, detector or detoxifier folder, built once."""
        if role not in self.folders:
            root = Path(tempfile.mkdtemp(prefix=f"realign-bench-{role}-"))
            if role == "guard":
                self.folders[role] = guard_folder(self.backend)
            elif role == "clip":
                self.folders[role] = build_tiny_clip(root / role)
            elif role == "reward":
                self.folders[role] = build_tiny_reward_model(root / role, seed=2, text=text_sizes(self.backend),
                                                             tokenizer=self.helper_tokenizer)
            else:
                build = build_tiny_detector if role == "detector" else build_tiny_detoxifier
                self.folders[role] = build(root / role, seed=0 if role == "detector" else 1,
                                           text=text_sizes(self.backend), tokenizer=self.helper_tokenizer)
        return self.folders[role]
