"""MLLM-Protector's helper models: loading (full checkpoints or LoRA adapters) and the two computations.

Kept apart from the defense because it is about checkpoints and batching, not about the method:
- `load_helper` loads a harm detector (`AutoModelForSequenceClassification`, one output) or a
  detoxifier (`AutoModelForCausalLM`) by hub id or folder. The released helpers are LoRA
  adapters; `peft` is not a dependency of this project, so an adapter loads only where it is
  installed, and otherwise the error names the adapter, its base and the way out (merge it).
- `Helper.p_safe` is the detector's sigmoid score, batched so that a batch scores exactly like
  single answers: right padding with EOS (the public code's pad token), and the model told that
  pad id, so each row is read at its own last token.
- `Helper.rewrite` is the detoxifier's greedy continuation, left-padded in batches, each row cut
  to its own budget (greedy decoding makes a longer run's prefix equal the shorter run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ModelLoadError

ROLES = {"detector": "AutoModelForSequenceClassification", "detoxifier": "AutoModelForCausalLM"}


@dataclass
class Helper:
    """A loaded helper model with its tokenizer; `adapter_base` is set when it came from a LoRA adapter."""

    role: str
    name: str
    model: Any
    tokenizer: Any
    device: str
    adapter_base: str | None = None

    def p_safe(self, texts: list[str], batch_size: int) -> list[float]:
        """sigmoid(logit) of each text (1 = safe), truncated at the tokenizer's maximum length."""
        import torch

        tok = self.tokenizer
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            rows = [tok(t, truncation=True)["input_ids"] or [_fallback_id(tok)] for t in texts[start : start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=self.device)
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            out += [float(x) for x in torch.sigmoid(logits.float().flatten())]
        return out

    def rewrite(self, prompts: list[str], max_length: int, max_new_tokens: int | None,
                batch_size: int) -> list[tuple[str, int]]:
        """(greedy continuation, new tokens) per prompt; budget = max_length minus the prompt (at least 1),
        capped by `max_new_tokens` when given."""
        import torch

        tok = self.tokenizer
        out: list[tuple[str, int]] = []
        for start in range(0, len(prompts), batch_size):
            rows = [tok(p)["input_ids"] for p in prompts[start : start + batch_size]]
            budgets = [max(max_length - len(r), 1) for r in rows]
            if max_new_tokens is not None:
                budgets = [min(b, max_new_tokens) for b in budgets]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            with torch.inference_mode():
                generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budgets),
                                                do_sample=False, pad_token_id=tok.pad_token_id)
            for row, budget in zip(generated[:, width:].tolist(), budgets):
                tokens = row[:budget]
                if tok.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(tok.eos_token_id) + 1]
                out.append((tok.decode(tokens, skip_special_tokens=True), len(tokens)))
        return out


def _fallback_id(tok: Any) -> int:
    """What an empty text is scored as: the BOS token alone (what a LLaMA tokenizer gives), else EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def adapter_config(name: str) -> dict[str, Any] | None:
    """The LoRA adapter config of a folder or hub id, or None for a full checkpoint."""
    from transformers.utils import find_adapter_config_file

    try:
        path = find_adapter_config_file(name)
    except (OSError, ValueError):
        return None
    return json.loads(Path(path).read_text(encoding="utf-8")) if path else None


def load_helper(role: str, name: str, base: str | None, device: str | None, dtype: str | None) -> Helper:
    """A detector or detoxifier by hub id or folder; ModelLoadError naming the role, the model and why."""
    import torch
    import transformers

    if role not in ROLES:
        raise ValueError(f"unknown helper role {role!r}")
    where = Path(name).expanduser()
    if (name.startswith((".", "~", "/")) or where.is_absolute()) and not where.is_dir():
        raise ModelLoadError(f"protector {role} folder {name!r} does not exist")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype) if dtype else
                              (torch.bfloat16 if device.startswith("cuda") else torch.float32)}
    if role == "detector":
        kwargs["num_labels"] = 1  # as the public code loads it: one logit, sigmoid = p(safe)
    cls = getattr(transformers, ROLES[role])
    adapter = adapter_config(name)
    try:
        if adapter is not None:
            base = base or adapter.get("base_model_name_or_path")
            model = _with_adapter(role, name, base, cls, kwargs)
            tokenizer = _tokenizer(name, base)
        else:
            if where.is_dir() and not (where / "config.json").is_file():
                raise ModelLoadError(f"protector {role} folder {name!r} is neither a transformers model "
                                     "(no config.json) nor a LoRA adapter (no adapter_config.json)")
            _check_head(role, name)
            model = cls.from_pretrained(name, **kwargs)
            tokenizer = _tokenizer(name, None)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the protector {role} {name!r} with {ROLES[role]}: {exc}") from exc
    tokenizer.pad_token = tokenizer.eos_token or tokenizer.pad_token  # the public code pads with EOS
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"protector {role} {name!r}: its tokenizer has neither an EOS nor a pad token")
    tokenizer.padding_side = "right" if role == "detector" else "left"
    model.config.pad_token_id = tokenizer.pad_token_id  # the detector reads each row at its last non-pad token
    return Helper(role, name, model.to(device).eval(), tokenizer, device, base if adapter else None)


def _check_head(role: str, name: str) -> None:
    """A detector folder must be a one-output sequence classifier (any other head would be random)."""
    if role != "detector":
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    archs = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise ModelLoadError(f"protector detector {name!r} is {', '.join(archs) or 'no listed architecture'} with "
                             f"{config.num_labels} label(s); it must be a sequence classifier with one output (1 = safe)")


def _with_adapter(role: str, name: str, base: str | None, cls: Any, kwargs: dict[str, Any]) -> Any:
    """Base model plus LoRA adapter, merged; a clear error when `peft` is missing."""
    try:
        import peft
    except ImportError:
        raise ModelLoadError(
            f"protector {role} {name!r} is a LoRA adapter on {base!r}; loading an adapter needs the `peft` "
            f"package, which is not installed. Install peft, or merge the adapter into its base and pass the "
            f"merged folder as {role}=<folder> (any full {ROLES[role]} checkpoint loads without peft)"
        ) from None
    if not base:
        raise ModelLoadError(f"protector {role} adapter {name!r} names no base model; give {role}_base=")
    model = cls.from_pretrained(base, **kwargs)
    return peft.PeftModel.from_pretrained(model, name).merge_and_unload()


def _tokenizer(name: str, base: str | None) -> Any:
    """The helper's tokenizer; for an adapter without tokenizer files, its base's."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        if base is None:
            raise
        return AutoTokenizer.from_pretrained(base)
