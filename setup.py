"""The optional C extension; everything else is in pyproject.toml.

``fdchannel._speedups`` (the compiled fast path of `Channel.send`/`recv`) is
built on Linux when a C compiler and the Python headers are there.  A build
that fails for want of them is skipped (``optional=True``) and the package
runs on its pure-Python path; Windows, macOS and the BSDs never build it.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform == "linux":
    ext_modules.append(
        Extension(
            "fdchannel._speedups",
            ["fdchannel/_speedups.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    )

setup(ext_modules=ext_modules)
