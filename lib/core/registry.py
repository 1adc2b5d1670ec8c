"""One registry mechanism for every family of methods the study compares.

Skills, merge methods, routers and continual strategies each live in one
:class:`Registry`: one small file per method registers it under the name params.yaml
uses, with the paper it implements, whether it draws random numbers, and its keyword
parameters (read from the function's signature). A family's registry imports every
module of its package the first time it is asked for a name, so adding a method is one
new file and no other edit; asking for an unknown name is an error that lists the known
ones. Hand-written: nothing in the field's libraries registers plug-ins this way.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

NAME = re.compile(r"[a-z][a-z0-9_]*")


class UnknownName(KeyError):
    """A name no method of the family is registered under; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered method: ``obj`` is what the stage calls (a function, a class or a value)."""

    name: str
    obj: Any
    kind: str
    paper: str = ""
    url: str = ""
    random: bool = False
    params: dict[str, Any] = field(default_factory=dict)


def keyword_params(obj: Any) -> dict[str, Any]:
    """Keyword-only parameters of a callable -> default (``inspect.Parameter.empty`` if required)."""
    if not callable(obj):
        return {}
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


class Registry:
    """Methods of one family (``kind``: "merge method", "router", ...) by name.

    ``package``: the dotted package holding one module per method; every module in it is
    imported on the first lookup (so registration happens by importing the file).
    """

    def __init__(self, kind: str, package: str | None = None, name_pattern: re.Pattern = NAME,
                 name_rule: str = "lowercase letters, digits and _ (starting with a letter)"):
        self.kind, self.package, self.name_pattern, self.name_rule = kind, package, name_pattern, name_rule
        self._entries: dict[str, Entry] = {}
        self._loaded = package is None

    # ---- registering

    def add(self, name: str, obj: Any, *, paper: str = "", url: str = "", random: bool = False) -> Entry:
        if not isinstance(name, str) or not self.name_pattern.fullmatch(name):
            raise ValueError(f"{self.kind} names are {self.name_rule}, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        entry = Entry(name, obj, self.kind, paper, url, bool(random), keyword_params(obj))
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None, *, paper: str = "", url: str = "",
                 random: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register("ties", paper="Yadav et al. 2023", url=...)``."""

        def deco(obj):
            self.add(name or obj.__name__, obj, paper=paper, url=url, random=random)
            return obj

        return deco

    def remove(self, name: str) -> None:
        """Forget a name (tests register toy methods and clean up after themselves)."""
        self._entries.pop(name, None)

    # ---- looking up

    def load(self) -> None:
        """Import every module of the family's package once (each registers its methods)."""
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_"):
                importlib.import_module(f"{self.package}.{mod.name}")

    def names(self) -> tuple[str, ...]:
        self.load()
        return tuple(self._entries)

    def get(self, name: str) -> Entry:
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries) or 'none'}") from None

    def __getitem__(self, name: str) -> Any:
        return self.get(name).obj

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def check(self, names: Iterable[str]) -> list[str]:
        """``names`` if each is registered and none is listed twice, else ValueError (for schemas)."""
        names = list(names)
        self.load()
        bad = [n for n in names if n not in self._entries]
        if bad:
            raise ValueError(f"unknown {self.kind} {bad}; known: {', '.join(self._entries)}")
        if len(set(names)) != len(names):
            raise ValueError(f"a {self.kind} is listed twice: {names}")
        return names


def resolve(path: str) -> Any:
    """The object at ``"package.module:attribute"``, imported on demand.

    The params schemas check method names with it: they name a family's registry by its
    path instead of importing it, so validating params.yaml neither imports the methods'
    code (torch, peft) nor makes every stage depend on every method family.
    """
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
