"""One event loop for a whole test module.

grpc.aio (the etcd client) keeps a poller bound to the first loop it served and
complains ("Event loop is closed") if each test ran its own with asyncio.run. A module
takes ``fixture, run = module_loop()``, registers ``fixture`` as an autouse
module-scoped fixture, and runs coroutines with ``run``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, Iterator


def module_loop() -> tuple[Callable[[], Iterator[asyncio.AbstractEventLoop]],
                           Callable[[Coroutine[Any, Any, Any]], Any]]:
    loops: list[asyncio.AbstractEventLoop] = []

    def fixture() -> Iterator[asyncio.AbstractEventLoop]:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        try:
            yield loop
        finally:
            loops.remove(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        assert loops, "the module's loop fixture is not active"
        return loops[-1].run_until_complete(coro)

    return fixture, run
