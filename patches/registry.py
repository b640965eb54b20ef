"""Patches as small objects: what they fix, when they are needed, and a reversible, idempotent apply.

A patch replaces attributes of a target object (a class, a module) in memory. Every replacement is
remembered with the original it hides, so that revert restores exactly what was there, and a
replacement carries the patch's name, so that applying twice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Optional

from packaging.version import Version

MARK = "__glm_portable_patch__"
Replacements = list[tuple[Any, str, Any]]  # (owner, attribute, new value)


@dataclass(frozen=True)
class Context:
    """What decides whether a patch is needed: the backend and the installed library versions."""

    backend: str
    versions: dict[str, Optional[str]]
    kernels: Any = None

    @classmethod
    def current(cls, backend: str, kernels: Any = None) -> "Context":
        from glm_portable.versions import library_versions

        return cls(backend, library_versions(), kernels)

    def at_least(self, library: str, version: str) -> bool:
        installed = self.versions.get(library)
        return installed is not None and Version(installed).release >= Version(version).release

    def below(self, library: str, version: str) -> bool:
        installed = self.versions.get(library)
        return installed is not None and Version(installed).release < Version(version).release


@dataclass(frozen=True)
class Decision:
    """``present`` is False when the module has nothing the patch targets (the patch does not concern it)."""

    needed: bool
    why: str
    present: bool = True


def since_transformers(ctx: Context, version: str, found: list[type], absent: str, older: str,
                       needed: str) -> Decision:
    """The decision most remote-code patches take: nothing in the module to fix (``absent``), an
    installed transformers older than ``version`` that runs the code as it is (``older``, after the
    version), or needed (``{classes}`` in ``needed`` names the classes found)."""
    if not found:
        return Decision(False, absent, present=False)
    if not ctx.at_least("transformers", version):
        return Decision(False, f"transformers {ctx.versions['transformers']} {older}")
    return Decision(True, needed.format(classes=", ".join(cls.__name__ for cls in found)))


@dataclass
class Patch:
    """One fix. ``needed`` looks at the context and, for remote-code patches, at the module itself,
    so that a model directory whose code already carries the fix is left alone. ``replacements``
    lists (owner, attribute, new value), built around what is there now; an owner may be a dict
    (``sys.modules``)."""

    name: str
    target: str
    symptom: str
    needed: Callable[[Context, Any], Decision]
    replacements: Callable[["Context", Any], Replacements]
    kind: str = "remote"
    installed: dict[tuple[int, str], tuple[Any, str, bool, Any]] = field(default_factory=dict, repr=False)

    def apply(self, ctx: "Context", target: Any = None) -> bool:
        """Install the replacements; False when they are already in place."""
        changed = False
        for owner, attribute, value in self.replacements(ctx, target):
            if getattr(_current(owner, attribute), MARK, None) == self.name:
                continue
            key = (id(owner), attribute)
            if key not in self.installed:
                self.installed[key] = (owner, attribute, attribute in _namespace(owner), _current(owner, attribute))
            setattr(value, MARK, self.name)
            if callable(value) and self.installed[key][3] is not None:
                value.__wrapped__ = self.installed[key][3]  # detectors read the code being patched
            _set(owner, attribute, value)
            changed = True
        return changed

    def original(self, owner: Any, attribute: str) -> Any:
        """What the owner held before this patch replaced it (what it holds now, when unpatched)."""
        saved = self.installed.get((id(owner), attribute))
        return saved[3] if saved is not None else _current(owner, attribute)

    def is_applied(self, target: Any = None) -> bool:
        return any(_belongs(owner, target) for owner, _, _, _ in self.installed.values())

    def revert(self, target: Any = None) -> None:
        """Put back exactly what apply replaced (on ``target`` and its classes only, when given)."""
        for key, (owner, attribute, existed, original) in list(self.installed.items()):
            if not _belongs(owner, target):
                continue
            if existed:
                _set(owner, attribute, original)
            elif isinstance(owner, dict):
                del owner[attribute]
            else:
                delattr(owner, attribute)
            del self.installed[key]


def _belongs(owner: Any, target: Any) -> bool:
    """Whether ``owner`` is ``target`` or a class the module ``target`` holds (not a class of an earlier
    execution of a module with the same name)."""
    return target is None or owner is target or (
        isinstance(owner, type) and isinstance(target, ModuleType) and vars(target).get(owner.__name__) is owner)


def _namespace(owner: Any) -> dict:
    """Where the owner keeps its attributes; a dict owner (``sys.modules``) is its own namespace."""
    return owner if isinstance(owner, dict) else vars(owner)


def _current(owner: Any, attribute: str) -> Any:
    """The attribute as the owner itself holds it (a class's own, not an inherited one)."""
    if isinstance(owner, (dict, type)):
        return _namespace(owner).get(attribute)
    return getattr(owner, attribute, None)


def _set(owner: Any, attribute: str, value: Any) -> None:
    if isinstance(owner, dict):
        owner[attribute] = value
    else:
        setattr(owner, attribute, value)


class MarkedProperty(property):
    """A property that can carry the patch mark (plain property objects take no attributes)."""


@dataclass
class Applied:
    """The patches applied in this process, in order, for run.json and bench records."""

    names: list[str] = field(default_factory=list)

    def add(self, name: str, where: str) -> None:
        entry = f"{name} ({where})"
        if entry not in self.names:
            self.names.append(entry)


APPLIED = Applied()
