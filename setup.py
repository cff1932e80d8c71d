"""Builds the compiled engine from csrc/ (metadata lives in pyproject.toml)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("udpflannel._engine", ["csrc/udpflannel/_engine.pyx"],
                   extra_compile_args=["-O3"])],
        include_path=["csrc"],
        compiler_directives={"language_level": "3"},
    ),
)
