"""Process memory: weights read into huge-page-advised buffers hold the file's bytes, and the advice reaches the OS."""

import os
from pathlib import Path

import pytest

from openautoglm.formats.checkpoint import read_owned


def _thp_offered() -> bool:
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return p.exists() and "[never]" not in p.read_text()


def _vm_flags(addr: int) -> list[str]:
    flags, inside = [], False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
    return flags


def test_read_owned_holds_the_file_bytes_on_huge_page_advised_memory(tmp_path):
    data = os.urandom((9 << 20) + 17)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 123 + data + b"tail")
    t = read_owned(path, 123, len(data), "blob")
    assert t.numpy().tobytes() == data
    small = read_owned(path, 5, 1000, "small")
    assert small.numpy().tobytes() == (b"x" * 123 + data)[5:1005]
    if not (_thp_offered() and Path("/proc/self/smaps").exists()):
        pytest.skip("no transparent huge pages on this OS")
    # the 2 MiB-aligned interior carries the advice (VmFlags "hg"): a 9 MiB buffer holds at least 6 MiB of it
    assert "hg" in _vm_flags(t.data_ptr() + (4 << 20))


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_map_owned_is_the_file_bytes_resident_only_where_read(tmp_path):
    from openautoglm.formats.checkpoint import map_owned

    data = os.urandom(48 << 20)
    path = tmp_path / "table.bin"
    path.write_bytes(b"h" * 5000 + data)  # an offset that is no page multiple
    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    before = _rss_file_kb()
    t = map_owned(path, 5000, len(data))
    assert _rss_file_kb() - before < 4096  # nothing read yet
    rows = t.view(-1, 4096)
    assert rows[7].numpy().tobytes() == data[7 * 4096:8 * 4096]  # one row: a page or two resident
    assert _rss_file_kb() - before < 8192
    assert t.numpy().tobytes() == data  # all of it: the file's bytes
    assert _rss_file_kb() - before >= 40 << 10
