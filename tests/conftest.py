"""Checks for the whole run. tests/sanitize.sh runs the engine's tests against an
engine built with sanitizers outside the tree and names where it is in
UDPFLANNEL_ENGINE_FROM: the run stops at once if another engine was imported."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    expected = os.environ.get("UDPFLANNEL_ENGINE_FROM")
    if not expected:
        return
    import udpflannel._engine as engine
    where = os.path.realpath(engine.__file__)
    if not where.startswith(os.path.realpath(expected) + os.sep):
        raise pytest.UsageError(f"udpflannel._engine was loaded from {where}, not from {expected}")
