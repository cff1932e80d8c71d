"""The installed package's version, for `udpflannel --version` and the info metric.

Read from the package metadata (pyproject.toml is the one place it is written), so a
source tree that was never installed reports "0+unknown" instead of a made-up number.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("udpflannel")
except PackageNotFoundError:  # running from a checkout that pip never installed
    __version__ = "0+unknown"
