"""The policy registry: name -> Policy class. Every policy module registers itself here.

The loader imports every module and subpackage directly inside `kvmux.policies`; a policy that needs
more than one file is a package whose `__init__` imports its policy module. Modules inside a package
are imported only by that package, so kernel modules with optional dependencies (`hip/triton_search.py`,
`sparse/triton_attention.py`, which need triton) are never imported here: the policy that uses one imports it
when the kernel actually runs. A policy module whose own optional dependency is missing is skipped with a
warning, so the other policies still load.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import kvmux.policies
from kvmux.policies.base import Policy

_REGISTRY: dict[str, type[Policy]] = {}
_SKIPPED: set[str] = set()
log = logging.getLogger(__name__)


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available by its `name`."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    """Import every module and subpackage of the policies package; policy modules register themselves."""
    for module in pkgutil.iter_modules(kvmux.policies.__path__):
        try:
            importlib.import_module(f"kvmux.policies.{module.name}")
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "kvmux":
                raise
            if module.name not in _SKIPPED:
                _SKIPPED.add(module.name)
                log.warning("policy module %s not loaded: it needs the package '%s'", module.name, exc.name)


def get_policy(name: str) -> Policy:
    """The policy registered as `name` (KeyError if none)."""
    _load_builtin()
    return _REGISTRY[name]()


def policy_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def import_policy_modules(names: list[str]) -> None:
    """Import out-of-tree policy modules (`policy_modules` in the server config); each registers its
    policies with `@register` on import, so presets can name them like the built-in ones."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SystemExit(f"policy_modules: cannot import '{name}': {exc}") from None
