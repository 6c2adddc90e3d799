"""The optional C core (``shmcast._native``); everything else is in pyproject.toml.

``optional=True``: where the extension does not compile (no compiler, no
Python headers), setuptools warns and installs the pure-Python package, which
``shmcast.native`` then reports as False.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmcast._native",
            sources=["src/shmcast/_native.c"],
            depends=["src/shmcast/_layout.h"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra"],
            # sem_open/sem_post live in libpthread before glibc 2.34 (manylinux2014).
            libraries=["pthread"],
            optional=True,
        )
    ]
)
