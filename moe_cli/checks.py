"""Config rules, checked once — when a config is made — and reported in the caller's words.

Every config dataclass of moe-cli (the MoE layer's :class:`~moe_cli.moe.config.MoEConfig`, the recipe sections, a
task's section) derives from :class:`Checked`: its ``validate(label)`` runs in ``__post_init__``, so a config that
exists is valid. ``label`` turns a field name into the way the caller's user spells it; the caller sets it around
the construction with :func:`labelled`:

- the library (default): the argument name, ``experts``;
- the command line: :func:`flag`, ``--experts``;
- a recipe: :func:`in_recipe`, ```model.upcycle.experts` in run.yaml``;
- a checkpoint: ```moe.experts` in the checkpoint metadata``.

A config keeps the label it was made with (:meth:`Checked.label`), so rules that can only be checked against a
model later (a layer index out of range, a hidden size that experts must divide) still name the field as its
user wrote it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from moe_cli.errors import ConfigError

Label = Callable[[str], str]


def argument(name: str) -> str:
    """The library's words: the argument (field) name itself."""
    return name


def flag(name: str) -> str:
    """``capacity_factor`` -> ``--capacity-factor`` (how the command line spells a field)."""
    return "--" + name.replace("_", "-")


class Origin:
    """Where the fields of a recipe came from: its file, or the `--set` assignment that gave a field (or a section
    above it) its value. ``origin(path)`` names the one that holds ``path``; ``str(origin)`` is the file."""

    def __init__(self, default: str, assignments: dict[str, str] | None = None):
        self.default, self.assignments = default, dict(assignments or {})

    def __call__(self, path: str) -> str:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            if (key := ".".join(parts[:i])) in self.assignments:
                return f"`--set {self.assignments[key]}`"
        return self.default

    def __str__(self) -> str:
        return self.default


def origin_of(src, path: str) -> str:
    """Where field ``path`` came from: ``src`` itself (a file name), or what an :class:`Origin` says."""
    return src(path) if isinstance(src, Origin) else str(src)


def in_recipe(prefix: str, src) -> Label:
    """```prefix.name` in src`` (how a recipe, or a checkpoint's metadata, spells a field); ``src`` an
    :class:`Origin` names the `--set` a field came from."""
    def label(name: str) -> str:
        path = f"{prefix}.{name}" if prefix else name
        return f"`{path}` in {origin_of(src, path)}"

    return label


_LABEL: contextvars.ContextVar[Label] = contextvars.ContextVar("moe_cli_label", default=argument)


@contextlib.contextmanager
def labelled(label: Label) -> Iterator[Label]:
    """Configs made inside this block report their errors (now and later) through ``label``."""
    token = _LABEL.set(label)
    try:
        yield label
    finally:
        _LABEL.reset(token)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(ok: bool, where: str, expected: str, value: Any) -> None:
    """The one wording of a refused value: ``<where> must be <expected>, got <value>``."""
    if not ok:
        raise ConfigError(f"{where} must be {expected}, got {value!r}")


def plain(value: Any) -> Any:
    """Plain data (choices as their strings) for YAML, JSON and safetensors metadata."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


class Checked:
    """Mixin of a frozen config dataclass whose rules (:meth:`validate`) are checked once, when it is made, in the
    words of the label in force (:func:`labelled`)."""

    def __post_init__(self) -> None:
        label = _LABEL.get()
        object.__setattr__(self, "_label", label)
        self.validate(label)

    def validate(self, label: Label) -> Checked:
        """Raise a one-line ConfigError naming the field through ``label`` if a rule is broken; returns self."""
        return self

    def words(self) -> Label:
        """The label this config was made with (how its user spells its fields)."""
        return self.__dict__.get("_label", argument)

    def label(self, name: str) -> str:
        """How the user who made this config spells field ``name``."""
        return self.words()(name)

    def values(self) -> dict:
        """The fields and their values (what ``dataclasses.replace`` and subclasses' constructors take)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> Checked:
        """``dataclasses.replace`` whose result is checked (and labelled) in this config's words."""
        with labelled(self.words()):
            return dataclasses.replace(self, **changes)

    def __getstate__(self) -> dict:  # labels are closures: a pickled config comes back in the library's words
        return {k: v for k, v in self.__dict__.items() if k != "_label"}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
