"""The project's error taxonomy (pure), after h11's split of "you" from "us".

Every failure that is not a bug derives from ``UdpflannelError``: its message is one
line for the operator and the command exits non-zero without a traceback. The CLI
catches exactly that root (and OSErrors the host raised); anything else is our bug,
reported as "internal error" with details under -v.

- ``BadInput``: what someone gave us does not validate: a flag, the network config,
  a lease or an annotation from the registry, subnet.env, a CNI request. Also a
  ValueError, so pure parsers can be used with ``except ValueError`` as aioquic's are.
- Other subclasses (one per outside thing: registry, TUN, netlink, rules, ports...)
  say the host or a service cannot do what was asked.

``RESOURCE_ERRNOS``: errors that mean "out of file descriptors or memory for now".
They are transient: whoever meets one logs it (rate-limited), counts it and retries;
they never end the daemon.
"""

from __future__ import annotations

import errno


class UdpflannelError(Exception):
    """An expected failure; ``str(e)`` is one line for the operator."""


class BadInput(UdpflannelError, ValueError):
    """Input from the operator, the registry, a peer or a runtime failed validation."""


RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def is_resource_exhaustion(e: BaseException) -> bool:
    """An OSError that means "no file descriptor / memory now", anywhere in its chain."""
    seen = 0
    link: BaseException | None = e
    while link is not None and seen < 8:
        if isinstance(link, OSError) and link.errno in RESOURCE_ERRNOS:
            return True
        link = link.__cause__ or link.__context__
        seen += 1
    return False
