"""The namespaces one child process makes, watched while it runs: a lab tool names every
namespace it makes after its tag and pid (netns.lab_prefix), so a test can check that
the child left none of its own behind without looking at what other work on the
machine makes and removes meanwhile."""

from __future__ import annotations

import os
import threading

from udpflannel.lab.netns import NETNS_RUN_DIR, lab_prefix


def namespaces(prefix: str) -> set[str]:
    """The namespaces whose names start with ``prefix``."""
    if not os.path.isdir(NETNS_RUN_DIR):
        return set()
    return {n for n in os.listdir(NETNS_RUN_DIR) if n.startswith(prefix)}


class NamespaceWatch:
    """Every namespace tagged ``tag`` that process ``pid`` makes, sampled each 0.1 s (a
    lab's namespaces live for seconds at least) from entry to exit of the ``with``."""

    def __init__(self, tag: str, pid: int) -> None:
        self.prefix = lab_prefix(tag, pid)
        self.seen: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            self.seen.update(namespaces(self.prefix))

    def __enter__(self) -> NamespaceWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)

    def assert_all_removed(self) -> None:
        """It made some (else the check proves nothing) and none is left."""
        assert self.seen, f"no namespace named {self.prefix}* seen while it ran: the check would prove nothing"
        left = namespaces(self.prefix)
        assert not left, f"left behind: {sorted(left)}"
