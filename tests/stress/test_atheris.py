"""Coverage-guided fuzzing with atheris (libFuzzer) of the two parsers of shared bytes.

* ``parse_control_header(buf, len(buf))`` on arbitrary bytes: returns a
  Geometry whose every field is within the limits, or raises ``ShmcastError``
  (the overflow code is checked where it is applied: ``Overflow.from_code``
  must name a policy or say None, for any code).
* ``RingReader.read`` on a ring built by the real writer, then overwritten at
  fuzzer-chosen offsets with fuzzer-chosen bytes (after the reader attached,
  as in shmcast): terminates within
  ``slots + 1`` reads, returns only events within the slot's bounds, never a
  negative drop count.

Anything else (another exception, an assertion) is a libFuzzer crash. libFuzzer
ends its process when the run ends, so each harness runs in a forked child
confined like the hypothesis fuzz (``_stress_helpers.confine``) and the test
asserts its exit code: 0 after ``-runs`` inputs without a crash. Crash inputs
go to a temporary directory, not the repository. ``stress`` only:

    python -m pytest -m stress tests/stress/test_atheris.py -p no:xdist

``SHMCAST_ATHERIS_RUNS`` sets the inputs per harness (default 1000000).
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
from _stress_helpers import Children, confine

from shmcast import ShmcastError
from shmcast._layout import (
    CONTROL_HEADER_SIZE,
    control_size,
    pack_ring_header,
    parse_control_header,
    ring_size,
)
from shmcast._names import (
    MAX_PUBLISHERS,
    MAX_SLOT_SIZE,
    MAX_SLOTS,
    MAX_SUBSCRIBERS,
    MAX_TYPE_BYTES,
)
from shmcast._ring import Overflow, RingReader, RingWriter, frame

atheris = pytest.importorskip("atheris")

pytestmark = [
    pytest.mark.stress,
    pytest.mark.timeout(900),
    pytest.mark.filterwarnings(r"ignore:This process \(pid=\d+\) is multi-threaded"),
]

RUNS = int(os.environ.get("SHMCAST_ATHERIS_RUNS", "1000000"))
MAX_SECONDS = 300  # per harness, whatever RUNS says


def control_one_input(data: bytes) -> None:
    try:
        g = parse_control_header(data, len(data))
    except ShmcastError:
        return
    assert len(data) >= CONTROL_HEADER_SIZE
    assert 1 <= g.slots <= MAX_SLOTS
    assert 1 <= g.slot_size <= MAX_SLOT_SIZE
    assert 1 <= g.max_subscribers <= MAX_SUBSCRIBERS
    assert 0 <= g.max_publishers <= MAX_PUBLISHERS
    assert control_size(g.max_subscribers, g.max_publishers) <= len(data)
    policy = Overflow.from_code(g.overflow)
    assert policy is None or policy.code == g.overflow
    assert 0 < len(g.codec) <= 32
    assert 0 <= g.mode <= 0o777


def ring_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    slots = fdp.ConsumeIntInRange(1, 8)
    slot_size = fdp.ConsumeIntInRange(1, 64)
    overwrite = fdp.ConsumeBool()
    buf = bytearray(ring_size(slots, slot_size))
    pack_ring_header(buf, slots=slots, slot_size=slot_size, nonce=1, ring_id=1)
    writer = RingWriter(memoryview(buf), slots, slot_size, overwrite)
    for v in range(1, fdp.ConsumeIntInRange(0, 3 * slots) + 1):
        writer.write(*frame(v, 0.0, b"e", b"x" * min(v, slot_size)))
    writer.release()
    # Made before the corruption, as a subscriber makes it on the ring it just created
    # (made on a corrupt ring: see test_fuzz.test_reader_made_on_a_corrupt_ring_...).
    reader = RingReader(memoryview(buf), slots, slot_size, overwrite)
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        off = fdp.ConsumeIntInRange(0, len(buf) - 1)
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 16))[: len(buf) - off]
        buf[off : off + len(chunk)] = chunk
    limit = fdp.ConsumeIntInRange(0, 64) if fdp.ConsumeBool() else None
    delivered = 0
    for _ in range(slots + 2):
        item = reader.read(limit)
        if item is None:
            break
        delivered += 1
        _version, _timestamp, type_, payload = item
        assert len(type_) <= MAX_TYPE_BYTES
        assert len(payload) <= slot_size
    else:
        raise AssertionError(f"read() returned more than the {slots} events a ring holds")
    # Nothing vanishes: every event the (maybe garbage) write counter claims up to the
    # limit was delivered or is counted as dropped.
    claimed = reader.written() if limit is None else min(reader.written(), limit)
    assert delivered + reader.drops(limit) >= claimed, (delivered, reader.drops(limit), claimed)
    reader.release()


def _fuzz(target, max_len: int) -> int:
    """Run libFuzzer on *target* in a confined child; its exit code."""
    artifacts = tempfile.mkdtemp(prefix="shmcast-atheris-")

    def body() -> int:
        confine()
        atheris.instrument_func(target)
        atheris.instrument_func(parse_control_header)
        if hasattr(RingReader.read, "__code__"):  # not the C core's (no SHMCAST_PURE=1)
            atheris.instrument_func(RingReader.read)
        atheris.Setup([sys.argv[0], f"-runs={RUNS}", f"-max_len={max_len}",
                       f"-max_total_time={MAX_SECONDS}", "-rss_limit_mb=0",
                       f"-artifact_prefix={artifacts}/", "-print_final_stats=1"],
                      target)
        atheris.Fuzz()  # libFuzzer exits the process itself
        return 9

    with Children() as kids:
        pid = kids.fork(body)
        code = kids.reap(pid, MAX_SECONDS + 120)
    crashes = os.listdir(artifacts)
    assert code == 0, f"libFuzzer exit code {code}; crash inputs in {artifacts}: {crashes}"
    os.rmdir(artifacts)
    return code


def test_atheris_parse_control_header():
    assert _fuzz(control_one_input, 4 * CONTROL_HEADER_SIZE) == 0


def test_atheris_ring_read():
    assert _fuzz(ring_one_input, 512) == 0
