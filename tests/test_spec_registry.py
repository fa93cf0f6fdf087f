"""Spec strings and the registry: typed parameters, clear errors, plugins, listing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from harness.models.resolve import parse_model_spec, resolve_backend
from harness.registry import Registry, defenses, judges, load_components, tasks
from harness.spec import SpecError, build_params, parse_spec


def test_parse_spec_keys_and_values():
    spec = parse_spec("cmrm:level=sample,alpha=0.5,layers=8-15")
    assert spec.name == "cmrm"
    assert spec.as_dict() == {"level": "sample", "alpha": "0.5", "layers": "8-15"}
    assert str(spec) == "cmrm:level=sample,alpha=0.5,layers=8-15"
    assert parse_spec("none").params == ()


def test_parse_spec_keeps_urls_and_rejects_garbage():
    spec = parse_spec("openai:model=gpt-4o,base_url=http://127.0.0.1:8000/v1")
    assert spec.as_dict()["base_url"] == "http://127.0.0.1:8000/v1"
    with pytest.raises(SpecError, match="not key=value"):
        parse_spec("cmrm:alpha")
    with pytest.raises(SpecError, match="given twice"):
        parse_spec("cmrm:alpha=1,alpha=2")
    with pytest.raises(SpecError, match="empty"):
        parse_spec("  ")


@dataclass
class _P:
    alpha: float = 1.0
    n: int = 3
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    items: list[str] = field(default_factory=list)
    path: str | None = None


def test_typed_coercion_and_errors():
    p = build_params(_P, parse_spec("x:alpha=0.25,n=7,flag=true,mode=b,items=SD+TYPO,path=none"), "thing")
    assert (p.alpha, p.n, p.flag, p.mode, p.items, p.path) == (0.25, 7, True, "b", ["SD", "TYPO"], None)
    with pytest.raises(SpecError, match="'alpha'.*not a number"):
        build_params(_P, parse_spec("x:alpha=big"), "thing")
    with pytest.raises(SpecError, match="not one of a, b"):
        build_params(_P, parse_spec("x:mode=c"), "thing")
    with pytest.raises(SpecError) as info:
        build_params(_P, parse_spec("x:bogus=1"), "thing")
    assert "bogus" in str(info.value) and "alpha, flag, items, mode, n, path" in str(info.value)


def test_unknown_component_lists_valid_names():
    with pytest.raises(SpecError) as info:
        tasks.build("nonexistent_task")
    assert "figstep" in str(info.value) and "demo" in str(info.value)
    with pytest.raises(SpecError, match="valid parameters"):
        defenses.build("none:alpha=1")


def test_builtins_registered():
    load_components()
    assert {"figstep", "demo"} <= set(tasks.names())
    assert "none" in defenses.names() and "keywords" in judges.names()


def test_model_specs_default_to_hf():
    assert parse_model_spec("llava-hf/llava-1.5-7b-hf").as_dict() == {"pretrained": "llava-hf/llava-1.5-7b-hf"}
    assert parse_model_spec("./some/dir").name == "hf"
    spec = parse_model_spec("openai:model=gpt-4o,api_key_env=MY_KEY")
    assert spec.name == "openai" and spec.as_dict()["api_key_env"] == "MY_KEY"
    entry, params = resolve_backend("hf:pretrained=x,dtype=bfloat16", {"device": "cpu", "dtype": "float32"})
    assert params.dtype == "bfloat16" and params.device == "cpu"  # explicit spec wins over overrides


def test_register_requires_params_and_rejects_duplicates():
    reg: Registry = Registry("widget")
    with pytest.raises(TypeError, match="Params"):
        reg.register("bad")(type("NoParams", (), {}))

    @reg.register("w")
    class W:
        @dataclass
        class Params:
            size: int = 1

        def __init__(self, params):
            self.params = params

    assert reg.build("w:size=4").params.size == 4
    with pytest.raises(ValueError, match="already registered"):
        reg.register("w")(type("Other", (), {"Params": W.Params}))


def test_entry_point_plugins_are_loaded(tmp_path, monkeypatch):
    """A third-party package registers a task through the `realign.plugins` entry-point group."""
    import importlib.metadata
    import sys

    import harness.registry as registry

    pkg = tmp_path / "realign_plugin_example.py"
    pkg.write_text(
        "from dataclasses import dataclass\n"
        "from harness.registry import task\n"
        "from harness.contracts.task import Task\n"
        "@task('plugin_example')\n"
        "class PluginTask(Task):\n"
        "    '''A task from a plugin.'''\n"
        "    @dataclass\n"
        "    class Params:\n"
        "        pass\n"
        "    def samples(self):\n"
        "        return iter(())\n"
        "    def metrics(self, samples, generations, verdicts):\n"
        "        return {}\n"
    )
    dist = tmp_path / "realign_plugin_example-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: realign-plugin-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[realign.plugins]\nexample = realign_plugin_example\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "plugin_example" in tasks.names()
    finally:
        sys.modules.pop("realign_plugin_example", None)
        tasks._entries.pop("plugin_example", None)


def test_credentials_in_spec_urls_are_refused_without_echoing_them():
    with pytest.raises(SpecError) as info:
        parse_spec("openai:model=gpt-4o,base_url=https://user:sk-secret@api.example/v1")
    assert "api_key_env" in str(info.value) and "sk-secret" not in str(info.value)
