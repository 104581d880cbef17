"""Compiles replicaproxy's data path (the session, its framers and its driver) with mypyc.

Everything else about the package is in pyproject.toml. The modules below are
plain, typed Python; mypyc also builds them as C extensions, which do the per-chunk
work in less CPU (bench/README.md, "Third round"). The install falls back to pure
Python, which behaves the same, when there is no C compiler or when the build fails,
and it is pure Python on purpose with ``REPLICAPROXY_COMPILE=0``.
``replicaproxy run`` logs which one it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

COMPILED = [
    "src/replicaproxy/core/events.py",
    "src/replicaproxy/core/session.py",
    "src/replicaproxy/core/framing.py",
    "src/replicaproxy/core/resp.py",
    "src/replicaproxy/core/http.py",
    "src/replicaproxy/core/postgres.py",
    "src/replicaproxy/core/memcached.py",
    "src/replicaproxy/io/driver.py",
]


class BuildDataPath(build_ext):
    """Build the compiled data path whole, or not at all.

    mypyc puts the code of both modules in one shared library and each module in a
    small stub that imports it: with one built and not the other, the package would
    not import. So any failure removes every output and leaves pure Python.
    """

    def finalize_options(self) -> None:
        # Here, not at import: metadata and sdists need no mypyc run.
        self.distribution.ext_modules = self._data_path()
        super().finalize_options()

    def _data_path(self) -> list[Any]:  # Extensions of setuptools' kind and distutils'
        if os.environ.get("REPLICAPROXY_COMPILE", "1") == "0":
            self.announce("replicaproxy: REPLICAPROXY_COMPILE=0, pure Python", level=2)
            return []
        try:
            from mypyc.build import mypycify

            return mypycify(COMPILED, opt_level="3", group_name="replicaproxy")
        except Exception as exc:  # mypyc missing or refusing the code: pure Python
            self.warn(f"replicaproxy: not compiling the data path (mypyc: {exc})")
            return []

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no C compiler, or it failed
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.warn(f"replicaproxy: compiling the data path failed, pure Python: {exc}")


# A stand-in so that setuptools runs build_ext at all; BuildDataPath replaces it.
setup(
    ext_modules=[Extension("replicaproxy._data_path", sources=[])],
    cmdclass={"build_ext": BuildDataPath},
)
