"""Build the optional C part: everything else is in pyproject.toml.

``wshub._directsend`` (see src/wshub/_directsend.c) is optional: without a C
compiler the install still succeeds and the fan-out writes through the event
loop's transports instead (slower, same behaviour).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wshub._directsend",
            sources=["src/wshub/_directsend.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        )
    ]
)
