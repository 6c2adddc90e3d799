"""The shmcast benchmark suite (issue 3): one harness, one adapter per peer.

Run it from the repository root with ``python -m benchmarks`` (full run, writes
``docs/``) or ``python -m benchmarks --quick`` (under a minute, what CI runs).
See ``docs/benchmarks.md``.
"""
