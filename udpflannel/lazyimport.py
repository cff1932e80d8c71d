"""Modules loaded on first use (importlib.util.LazyLoader).

A restart forwards before it asks anyone anything; what only later steps need
(pyroute2 behind host/netconf, the registry clients, prometheus) must not delay it.
``lazy("udpflannel.host.netconf")`` returns the module at once and runs it on the
first attribute access.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
