"""Go's `flag` package command-line syntax, as flanneld parses its arguments (pure).

Theory of operation (Go's flag.FlagSet.Parse, which flanneld calls on os.Args[1:]):

- `-name` and `--name` are the same flag; a value is `-name=value` or, for a flag
  that is not boolean, the next argument (`-name value`, even if it starts with `-`).
- A boolean is `-name` (true) or `-name=value`, never `-name value`: the value would
  be the first non-flag argument.
- Names are matched whole: no abbreviations. `-h` / `-help` ask for help unless a
  flag has that name.
- Parsing stops at the first argument that is not a flag (`-` alone, or anything not
  starting with `-`) and after `--`; what is left is returned to the caller.

Values are parsed afterwards by the caller; `parse_bool` and `parse_int` are Go's
strconv rules for the two kinds flanneld's own flags use. Errors carry Go's wording.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence


class GoFlagError(ValueError):
    """A command line Go's flag package refuses; the message is Go's."""


class GoFlagHelp(Exception):
    """-h, -help or --help (and no flag of that name)."""


def parse(args: Sequence[str], is_bool: Callable[[str], bool | None]
          ) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(flags in the order given as (name, value or None for a bare boolean), the
    arguments left after the flags). ``is_bool(name)`` is None for an unknown name."""
    args = list(args)
    out: list[tuple[str, str | None]] = []
    while args:
        s = args[0]
        if len(s) < 2 or s[0] != "-":
            break
        minuses = 2 if s[1] == "-" else 1
        if s == "--":
            args.pop(0)
            break
        name = s[minuses:]
        if not name or name[0] in "-=":
            raise GoFlagError(f"bad flag syntax: {s}")
        args.pop(0)
        value: str | None = None
        if "=" in name[1:]:
            name, value = name.split("=", 1)
        kind = is_bool(name)
        if kind is None:
            if name in ("h", "help"):
                raise GoFlagHelp()
            raise GoFlagError(f"flag provided but not defined: -{name}")
        if not kind and value is None:
            if not args:
                raise GoFlagError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        out.append((name, value))
    return out, args


_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def parse_bool(text: str) -> bool:
    """strconv.ParseBool: exactly these spellings (no yes/no, no on/off)."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("parse error")


_INT = re.compile(r"[+-]?(0[xX][_0-9a-fA-F]+|0[oO][_0-7]+|0[bB][_01]+|0[_0-7]*|[1-9][_0-9]*)")
_BITS = 64  # Go's int on the 64-bit platforms flanneld ships for


def parse_int(text: str, bits: int = _BITS, base0: bool = True) -> int:
    """strconv.ParseInt(text, 0, 64) as flag.IntVar uses it: decimal, 0x.., 0o.., 0b..,
    a leading 0 for octal, `_` between digits; ``base0=False`` is base 10 only (klog's
    -v). ValueError "parse error" or "value out of range", Go's flag wording."""
    if base0:
        if not _INT.fullmatch(text) or "__" in text or text.endswith("_"):
            raise ValueError("parse error")
        body = text.lstrip("+-")
        if body[:2].lower() in ("0x", "0o", "0b"):
            digits, base = body[2:], {"x": 16, "o": 8, "b": 2}[body[1].lower()]
        elif body.startswith("0") and len(body) > 1:
            digits, base = body[1:], 8
        else:
            digits, base = body, 10
        try:
            value = int(digits.replace("_", ""), base)
        except ValueError:
            raise ValueError("parse error") from None
        value = -value if text.startswith("-") else value
    else:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError("parse error")
        value = int(text)
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError("value out of range")
    return value
