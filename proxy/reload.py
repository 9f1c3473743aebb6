"""What a configuration re-read on SIGHUP changes in the running daemon.

Pure: :func:`apply` takes the settings in effect, the settings just read and
the registered :class:`ReloadHook` list, runs every hook once, and returns a
:class:`ReloadReport` naming what was applied, what failed and which changed
keys only a restart can put into effect.  The daemon's shell reads the file
(off the event loop), calls :func:`apply` and logs the report as one line.

A hook covers some dotted settings keys (``"log.level"``) or whole sections
(``"security"``).  Every hook runs on every reload, changed or not: the TLS
hook reads the certificate files again, which is how a renewed certificate is
taken up, and the table hook reloads the endpoint table as SIGHUP always has.
A hook receives the settings in effect with every covered key taken from the
new file; keys no hook covers keep their running value, so a hook never sees
a value that will not be in effect (the TLS hook sees the running
``tls.min_version`` until a restart).  A hook that raises has failed: its
keys keep their running value and the error is reported; the others still
apply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from proxy.config import Settings

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ReloadHook:
    """``apply(settings)`` puts the ``keys`` it covers into effect, or raises."""

    name: str
    keys: tuple[str, ...]
    apply: Callable[[Settings], object]

    def covers(self, key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in self.keys)


@dataclass(frozen=True)
class ReloadReport:
    settings: Settings
    """The settings now in effect: the running ones with the applied keys replaced."""
    applied: list[str] = field(default_factory=list)
    """Names of the hooks that ran without error."""
    failed: dict[str, str] = field(default_factory=dict)
    """Hook name -> why it failed; its keys keep their running value."""
    changed: list[str] = field(default_factory=list)
    """Keys whose new value differs from the running one."""
    restart: list[str] = field(default_factory=list)
    """Changed keys no hook covers: they take effect at the next start."""


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, descending into nested sections."""
    keys: list[str] = []
    for name in type(old).model_fields:
        before, after = getattr(old, name), getattr(new, name)
        key = prefix + name
        if isinstance(before, BaseModel) and type(before) is type(after):
            keys += changed_keys(before, after, key + ".")
        elif before != after:
            keys.append(key)
    return keys


def lookup(model: BaseModel, key: str) -> Any:
    value: Any = model
    for part in key.split("."):
        value = getattr(value, part)
    return value


def replace(model: M, key: str, value: object) -> M:
    """``model`` with the dotted ``key`` set to ``value`` (already validated)."""
    head, _, rest = key.partition(".")
    if rest:
        value = replace(getattr(model, head), rest, value)
    return model.model_copy(update={head: value})


def apply(running: Settings, new: Settings, hooks: Sequence[ReloadHook]) -> ReloadReport:
    """Run every hook with the new values of the keys it covers (see module doc)."""
    changed = changed_keys(running, new)
    owner = {key: next((h.name for h in hooks if h.covers(key)), None) for key in changed}
    restart = [key for key, name in owner.items() if name is None]
    effective = running
    for key, name in owner.items():
        if name is not None:
            effective = replace(effective, key, lookup(new, key))
    applied: list[str] = []
    failed: dict[str, str] = {}
    for hook in hooks:
        try:
            hook.apply(effective)
        except Exception as exc:  # a hook's failure is reported, never fatal
            failed[hook.name] = str(exc) or type(exc).__name__
        else:
            applied.append(hook.name)
    for key, name in owner.items():
        if name in failed:
            effective = replace(effective, key, lookup(running, key))
    return ReloadReport(effective, applied, failed, changed, restart)
