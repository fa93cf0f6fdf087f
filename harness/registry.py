"""One registry mechanism for backends, tasks, defenses and judges.

A component is a class with a nested `Params` dataclass; it registers itself with a decorator
(`@task("figstep")`). Third-party packages add components through the entry-point group
`realign.plugins`: each entry point names a module (or a callable) that registers on import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from harness.spec import Spec, SpecError, build_params, parse_spec

log = logging.getLogger(__name__)

T = TypeVar("T")

# Packages whose modules register built-in components on import; every module in them is
# imported on first lookup, so a new component file needs no list to be kept in sync.
BUILTIN_PACKAGES = ("harness.models", "harness.defenses", "tasks", "judges", "attacks")
PLUGIN_GROUP = "realign.plugins"


@dataclass
class Entry:
    name: str
    cls: type
    summary: str


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorate(cls: type[T]) -> type[T]:
            if not hasattr(cls, "Params"):
                raise TypeError(f"{self.kind} {name!r}: class {cls.__name__} needs a nested Params dataclass")
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].cls!r}")
            doc = (cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, cls, doc[0] if doc else "")
            cls.registered_name = name  # type: ignore[attr-defined]
            return cls

        return decorate

    def names(self) -> list[str]:
        load_components()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        load_components()
        return [self._entries[n] for n in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        load_components()
        return name in self._entries

    def get(self, name: str) -> Entry:
        load_components()
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise SpecError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {valid}")
        return self._entries[name]

    def build(self, spec: str | Spec, **context: Any) -> T:
        """Instantiate the component a spec string names, with validated parameters."""
        parsed = parse_spec(spec) if isinstance(spec, str) else spec
        entry = self.get(parsed.name)
        params = build_params(entry.cls.Params, parsed, self.kind)
        obj = entry.cls(params, **context)
        obj.spec = str(parsed)  # type: ignore[attr-defined]
        return obj


backends: Registry[Any] = Registry("backend")
tasks: Registry[Any] = Registry("task")
defenses: Registry[Any] = Registry("defense")
judges: Registry[Any] = Registry("judge")
attacks: Registry[Any] = Registry("attack")

REGISTRIES = {"backends": backends, "tasks": tasks, "defenses": defenses, "judges": judges, "attacks": attacks}


def backend(name: str) -> Callable[[type[T]], type[T]]:
    return backends.register(name)


def task(name: str) -> Callable[[type[T]], type[T]]:
    return tasks.register(name)


def defense(name: str) -> Callable[[type[T]], type[T]]:
    return defenses.register(name)


def judge(name: str) -> Callable[[type[T]], type[T]]:
    return judges.register(name)


def attack(name: str) -> Callable[[type[T]], type[T]]:
    return attacks.register(name)


_loaded = False


def load_components() -> None:
    """Import built-ins and entry-point plugins once. A broken plugin is reported, not fatal."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package in BUILTIN_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package}.{info.name}")
    for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type):
                loaded()
        except Exception as exc:  # a third-party plugin must not break the harness
            log.warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)
