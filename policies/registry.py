"""The policy registry: name -> Policy class. Every policy module registers itself here."""

from __future__ import annotations

import importlib
import pkgutil

import kvmux.policies
from kvmux.policies.base import Policy

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    """Import every module of the policies package; policy modules register themselves."""
    for module in pkgutil.iter_modules(kvmux.policies.__path__):
        importlib.import_module(f"kvmux.policies.{module.name}")


def get_policy(name: str) -> Policy:
    """The policy registered as `name` (KeyError if none)."""
    _load_builtin()
    return _REGISTRY[name]()


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)
