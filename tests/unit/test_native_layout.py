"""One layout for C, Python and the docs: the generated header, the extension and docs/design.md."""

from __future__ import annotations

import importlib
import itertools
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from shmcast import _layout
from shmcast._names import MAX_TYPE_BYTES

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\s*(\d+)\s+(\d+|\.\.\.)\s+(\S.*?)\s*$")


def tables(text: str) -> list[list[tuple[int, str, str]]]:
    """Every byte table (rows of ``off size field``) in *text*, in order."""
    found: list[list[tuple[int, str, str]]] = []
    current: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            current.append((int(m[1]), m[2], m[3]))
        elif current:
            found.append(current)
            current = []
    if current:
        found.append(current)
    return found


def ring_tables(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str]]]:
    """The ring header's table (it starts with magic b"SHMCRING") and the slot's (seq first)."""
    all_tables = tables(text)
    ring = [t for t in all_tables if "SHMCRING" in t[0][2]]
    slot = [t for t in all_tables if t[0][2].startswith("seq")]
    assert len(ring) == 1, "one ring table"
    assert len(slot) == 1, "one slot table"
    return ring[0], slot[0]


def offset_of(table: list[tuple[int, str, str]], name: str) -> int:
    rows = [off for off, _, field in table if re.match(rf"{re.escape(name)}(?!\w)", field)]
    assert len(rows) == 1, f"one row named {name!r}"
    return rows[0]


def native() -> ModuleType:
    try:
        return importlib.import_module("shmcast._native")
    except ImportError:
        pytest.skip("the C extension is not built here")


DOCS = (ROOT / "docs" / "design.md").read_text()
DOCSTRING = _layout.__doc__ or ""


def test_generated_header_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_layout_h.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("text", [DOCS, DOCSTRING], ids=["design.md", "_layout.py"])
def test_ring_and_slot_tables_match_the_constants(text: str) -> None:
    ring, slot = ring_tables(text)
    assert offset_of(ring, "w:") == _layout.W_OFF == _layout.Q_W * 8
    assert offset_of(ring, "rejected") == _layout.REJECTED_OFF == _layout.Q_REJECTED * 8
    assert offset_of(ring, "end:") == _layout.END_OFF == _layout.Q_END * 8
    assert offset_of(ring, "r:") == _layout.R_OFF == _layout.Q_R * 8
    assert offset_of(ring, "delivered") == _layout.DELIVERED_OFF == _layout.Q_DELIVERED * 8
    assert ring[-1][0] == _layout.RING_HEADER_SIZE  # the slots start after the header
    assert [(o, s) for o, s, _ in slot] == [(0, "8"), (8, "8"), (16, "8"), (24, "2"), (26, "2"),
                                            (28, "4"), (32, "...")]
    assert offset_of(slot, "version") == _layout.SLOT_BODY_OFF
    assert slot[-1][0] == _layout.SLOT_HEADER_SIZE
    # Rows tile the header: each one starts where the previous one ended.
    for table in (ring, slot):
        for (off, size, _), (nxt, _, _) in itertools.pairwise(table):
            assert off + int(size) == nxt, (off, size, nxt)


def test_docs_and_layout_docstring_agree_on_the_ring() -> None:
    for ours, theirs in zip(ring_tables(DOCS), ring_tables(DOCSTRING), strict=True):
        assert [(o, s) for o, s, _ in ours] == [(o, s) for o, s, _ in theirs]


def test_docs_name_the_control_fields_at_their_offsets() -> None:
    control = next(t for t in tables(DOCS) if "SHMCAST" in t[0][2])
    assert offset_of(control, "state") == _layout.STATE_OFF
    assert offset_of(control, "version:") == _layout.VERSION_OFF
    assert offset_of(control, "drops of departed") == _layout.RETIRED_OFF
    assert offset_of(control, "registry epoch") == _layout.EPOCH_OFF


def test_extension_was_built_with_this_layout() -> None:
    layout = native().LAYOUT
    slot_fields = [8 + o for o in (0, 8, 16, 20)]  # after seq: version, timestamp, lengths
    assert layout == {
        "RING_HEADER_SIZE": _layout.RING_HEADER_SIZE,
        "W_OFF": _layout.W_OFF, "REJECTED_OFF": _layout.REJECTED_OFF,
        "END_OFF": _layout.END_OFF, "R_OFF": _layout.R_OFF,
        "DELIVERED_OFF": _layout.DELIVERED_OFF,
        "Q_W": _layout.Q_W, "Q_REJECTED": _layout.Q_REJECTED, "Q_END": _layout.Q_END,
        "Q_R": _layout.Q_R, "Q_DELIVERED": _layout.Q_DELIVERED,
        "END_OPEN": _layout.END_OPEN, "END_BUS_CLOSED": _layout.END_BUS_CLOSED,
        "SLOT_SEQ_OFF": 0, "SLOT_BODY_OFF": _layout.SLOT_BODY_OFF,
        "SLOT_HEADER_SIZE": _layout.SLOT_HEADER_SIZE, "MAX_TYPE_BYTES": MAX_TYPE_BYTES,
        "CTRL_VERSION_OFF": _layout.VERSION_OFF, "CTRL_EPOCH_OFF": _layout.EPOCH_OFF,
        "SLOT_VERSION_OFF": slot_fields[0], "SLOT_TIMESTAMP_OFF": slot_fields[1],
        "SLOT_TYPE_LEN_OFF": slot_fields[2], "SLOT_DATA_LEN_OFF": slot_fields[3],
    }
    # The slot header struct puts its fields where the C code reads them.
    packed = _layout.SLOT_HEADER.pack(0x0102030405060708, 1.5, 0x0A0B, 0x0C0D0E0F)
    assert packed[slot_fields[0] - 8:][:8] == (0x0102030405060708).to_bytes(8, "little")
    assert packed[slot_fields[2] - 8:][:2] == (0x0A0B).to_bytes(2, "little")
    assert packed[slot_fields[3] - 8:][:4] == (0x0C0D0E0F).to_bytes(4, "little")


@pytest.mark.parametrize("size", [1, 7, 8, 100, 4096, 64 * 1024 * 1024])
def test_extension_slot_stride(size: int) -> None:
    assert native().slot_stride(size) == _layout.slot_stride(size)
