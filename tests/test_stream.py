"""HashingWriter: pieces filled in order through maps, copied and hashed on threads, maps bounded."""

import hashlib
import threading

import numpy as np
import pytest

from adaptrix.toolchain import stream
from adaptrix.toolchain.stream import HashingWriter, OutputSpaceError


def test_the_file_and_its_digest_hold_every_piece_in_order(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1, 4096, 300_000, 7)]
    size = sum(a.nbytes for a in arrays) + 5000 + 10 + 3 + 300
    with HashingWriter(tmp_path / "out.bin", size, budget=1 << 20) as writer:
        writer.put(arrays[0])  # 4 bytes: later maps start inside a page
        writer.copy(source, 100, 5000)
        writer.fill(arrays[1].nbytes, lambda view: np.copyto(view.view(np.float32), arrays[1]))
        writer.skip(10)
        writer.put(arrays[2])  # alone over the budget: still taken
        writer.copy(source, 0, 0)
        writer.fill(0, lambda view: None)
        writer.put(b"abc")
        writer.fill(300, lambda view: np.add(view, 1, out=view), source=(source, 7))  # changed in place
        writer.put(arrays[3])
        assert writer.offset == size
        digest = writer.close()
    data = source.read_bytes()
    patched = bytes((b + 1) % 256 for b in data[7:307])
    expected = b"".join([arrays[0].tobytes(), data[100:5100], arrays[1].tobytes(), b"\0" * 10,
                         arrays[2].tobytes(), b"abc", patched, arrays[3].tobytes()])  # fmt: skip
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()


def test_mapped_bytes_stay_within_the_budget(tmp_path):
    budget, size, count = 3 << 20, 1 << 20, 40
    peak, lock = [0], threading.Lock()
    writer = HashingWriter(tmp_path / "out.bin", count * size, budget=budget)

    def compute(view):
        with lock:
            peak[0] = max(peak[0], writer._in_flight)
        view[:] = 7

    with writer:
        for _ in range(count):
            writer.fill(size, compute)
    assert peak[0] <= budget
    assert writer._in_flight == 0
    assert (tmp_path / "out.bin").read_bytes() == b"\7" * (count * size)


def test_a_failed_copy_is_raised_in_the_callers_thread(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 100)
    writer = HashingWriter(tmp_path / "out.bin", 500 + 100 * (1 << 16))
    writer.copy(short, 50, 500)  # runs past the end
    with pytest.raises(Exception, match="ended early"):
        for _ in range(100):
            writer.put(np.zeros(1 << 16, np.uint8))
        writer.close()
    writer.abort()  # after a failure: closes without raising again


def test_a_piece_past_the_size_and_a_short_file_are_refused(tmp_path):
    with pytest.raises(ValueError, match="exceed its size"), HashingWriter(tmp_path / "a.bin", 4) as writer:
        writer.put(b"12345")
    with pytest.raises(ValueError, match="exceed its size"), HashingWriter(tmp_path / "c.bin", 4) as writer:
        writer.skip(5)
    writer = HashingWriter(tmp_path / "b.bin", 8)
    writer.put(b"1234")
    with pytest.raises(ValueError, match="4 bytes written of 8"):
        writer.close()


def test_a_file_too_big_for_the_disk_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(OutputSpaceError, match="no room") as caught:
        HashingWriter(tmp_path / "huge.bin", 1 << 60)
    assert "huge.bin" in caught.value.line()
    assert not (tmp_path / "huge.bin").exists()


def test_without_maps_pieces_are_computed_in_memory_and_written(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # as a file system without mmap answers

    monkeypatch.setattr(stream.mmap, "mmap", refuse)
    arrays = [np.arange(n, dtype=np.float32) for n in (3, 70_000)]
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)))
    size = sum(a.nbytes for a in arrays) + 5 + 100
    with HashingWriter(tmp_path / "out.bin", size, budget=1 << 16) as writer:
        writer.put(arrays[0])
        writer.skip(5)
        writer.fill(arrays[1].nbytes, lambda view: np.copyto(view.view(np.float32), arrays[1]))
        writer.fill(100, lambda view: np.add(view, 1, out=view), source=(source, 20))
        digest = writer.close()
    expected = arrays[0].tobytes() + bytes(5) + arrays[1].tobytes() + bytes(range(21, 121))
    assert (tmp_path / "out.bin").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert writer._in_flight == 0


def test_a_file_system_without_preallocation_still_gets_the_file(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(stream.os, "posix_fallocate", refuse)
    with HashingWriter(tmp_path / "out.bin", 6) as writer:
        writer.put(b"abc")
        writer.skip(3)
    assert (tmp_path / "out.bin").read_bytes() == b"abc\0\0\0"
