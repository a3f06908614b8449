"""Build the optional C part: everything else is in pyproject.toml.

``wshub._directsend`` (see src/wshub/_directsend.c), ``wshub._ingest``
(src/wshub/_ingest.c) and ``wshub._runpack`` (src/wshub/_runpack.c) are
optional: without a C compiler the install still succeeds, the fan-out writes
through the event loop's transports instead, frames are read in Python and a
history run is packed in Python (slower, same behaviour).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wshub._directsend",
            sources=["src/wshub/_directsend.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "wshub._ingest",
            sources=["src/wshub/_ingest.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "wshub._runpack",
            sources=["src/wshub/_runpack.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
    ]
)
