"""Builds the compiled engine from csrc/ (metadata lives in pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("udpflannel._engine", ["csrc/udpflannel/_engine.pyx"],
                   depends=["csrc/udpflannel/_engine.pxd", "csrc/udpflannel/_tables.pxi",
                            "csrc/udpflannel/_datapath.pxi", "csrc/udpflannel/_tx.pxi",
                            "csrc/udpflannel/_rx.pxi", "csrc/udpflannel/netio.h",
                            "csrc/udpflannel/threads.h"],
                   extra_compile_args=["-O3", "-pthread"], extra_link_args=["-pthread"])],
        include_path=["csrc"],
        compiler_directives={"language_level": "3"},
    ),
)
