"""The compiled engine's data path never takes the GIL.

Cython makes a nogil function take the GIL at its exit whenever the function has a
Python object local, even one only used inside a ``with gil`` block. That cost a
PyGILState_Ensure/Release (a Python thread state created and destroyed, and a wait
for the GIL held by the event loop) on every packet the data threads sent or wrote.
Only the functions below may take it: test-only capture and Cython's own helpers.
"""

import re
from pathlib import Path

GENERATED = Path(__file__).resolve().parents[2] / "csrc" / "udpflannel" / "_engine.c"
MAY_TAKE_GIL = {"capture"}
FUNCTION = re.compile(r"^static [^;]*?\b__pyx_f_10udpflannel_7_engine_(\w+)\(.*\{\s*$")


def functions_taking_the_gil(source: str) -> set[str]:
    takers, current = set(), None
    for line in source.splitlines():
        match = FUNCTION.match(line)
        if match:
            current = match.group(1)
        elif line.startswith("}"):
            current = None
        elif current and "PyGILState_Ensure" in line:
            takers.add(current)
    return takers


def test_only_capture_takes_the_gil():
    # The build (make / pip install -e .) writes the C next to the .pyx; the test
    # suite always runs after it.
    takers = functions_taking_the_gil(GENERATED.read_text())
    assert takers == MAY_TAKE_GIL, f"nogil data-path functions that take the GIL: {takers - MAY_TAKE_GIL}"


def test_the_scanner_sees_a_gil_taker():
    src = ("static int __pyx_f_10udpflannel_7_engine_send_window(int x) {\n"
           "  __pyx_gilstate_save = __Pyx_PyGILState_Ensure();\n}\n")
    assert functions_taking_the_gil(src) == {"send_window"}
