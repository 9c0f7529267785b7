"""HashingWriter: pieces filled in order through staging buffers, written and hashed on threads, bounded."""

import fcntl
import hashlib
import threading

import numpy as np
import pytest

from adaptrix.io import staging, stream
from adaptrix.io.stream import HashingWriter, OutputSpaceError


def test_the_file_and_its_digest_hold_every_piece_in_order(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1, 4096, 300_000, 7)]
    size = sum(a.nbytes for a in arrays) + 5000 + 10 + 3 + 300
    with HashingWriter(tmp_path / "out.bin", size, budget=1 << 20) as writer:
        writer.put(arrays[0])  # 4 bytes: later pieces start inside a page
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


def test_bytes_in_flight_stay_within_the_budget(tmp_path):
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


def test_a_short_source_is_refused_at_once(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 100)
    writer = HashingWriter(tmp_path / "out.bin", 500)
    with pytest.raises(Exception, match="ended early"):
        writer.copy(short, 50, 500)  # runs past the end
    assert writer._in_flight == 0
    writer.abort()


def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(stream.os, "pwrite", fail)
    writer = HashingWriter(tmp_path / "out.bin", 100 * (1 << 16))
    with pytest.raises(OSError, match="Input/output error"):
        for _ in range(100):
            writer.put(np.zeros(1 << 16, np.uint8))
        writer.close()
    writer.abort()  # after a failure: closes without raising again


def test_large_pieces_go_through_reused_buffers(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "_CHUNK", 1 << 16)
    monkeypatch.setattr(staging, "MIN_BUFFER", (1 << 16) + staging.BLOCK)
    monkeypatch.setattr(staging, "POOL", staging.BufferPool(1 << 20))
    seen = set()
    taken = staging.POOL.take

    def take(length):
        buffer = taken(length)
        seen.add(buffer.ctypes.data)
        return buffer

    monkeypatch.setattr(staging.POOL, "take", take)
    data = np.random.default_rng(1).integers(0, 256, 40 << 16, dtype=np.uint8)
    source = tmp_path / "source.bin"
    source.write_bytes(data.tobytes())
    with HashingWriter(tmp_path / "out.bin", 2 * data.nbytes, budget=4 << 16) as writer:
        writer.put(data)  # in pieces of at most a chunk, never more than the budget in flight
        writer.copy(source, 0, data.nbytes)
    assert (tmp_path / "out.bin").read_bytes() == data.tobytes() * 2
    assert len(seen) <= 5  # the budget's four buffers and the one always allowed, taken again and again


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


def test_a_file_system_without_preallocation_still_gets_the_file(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(stream.os, "posix_fallocate", refuse)
    with HashingWriter(tmp_path / "out.bin", 6) as writer:
        writer.put(b"abc")
        writer.skip(3)
    assert (tmp_path / "out.bin").read_bytes() == b"abc\0\0\0"


def _write_sample(path):
    data = np.random.default_rng(2).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8)
    with HashingWriter(path, data.nbytes + 10) as writer:
        writer.put(data[:5])
        writer.put(data[5:])
        writer.skip(10)
    assert path.read_bytes() == data.tobytes() + bytes(10)
    return writer._direct


def test_the_file_is_written_directly_where_the_file_system_allows(tmp_path):
    if not staging.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    writer = HashingWriter(tmp_path / "out.bin", 8192)
    flags = fcntl.fcntl(writer._fd, fcntl.F_GETFL)
    writer.abort()
    assert bool(flags & staging.DIRECT) == writer._direct  # tmpfs may refuse it: then buffered
    assert _write_sample(tmp_path / "out.bin") == writer._direct


def test_a_file_system_that_refuses_direct_io_gets_buffered_writes(tmp_path, monkeypatch):
    opened = stream.os.open

    def refuse_direct(path, flags, *args):
        if flags & staging.DIRECT:
            raise OSError(22, "Invalid argument")
        return opened(path, flags, *args)

    monkeypatch.setattr(staging, "DIRECT", staging.DIRECT or 0o40000)
    monkeypatch.setattr(stream.os, "open", refuse_direct)
    assert _write_sample(tmp_path / "out.bin") is False


def test_a_direct_write_refused_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    if not staging.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    written = stream.os.pwrite
    calls = []

    def refuse_first(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")  # as a file system taking O_DIRECT only at open
        return written(fd, data, offset)

    monkeypatch.setattr(stream.os, "pwrite", refuse_first)
    path = tmp_path / "out.bin"
    forced = staging.open_output
    monkeypatch.setattr(staging, "open_output", lambda p: (forced(p)[0], True))
    assert _write_sample(path) is False
    assert len(calls) >= 2


def test_pieces_read_ahead_are_filled_in_order_and_given_back_on_failure(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    source = tmp_path / "source.bin"
    source.write_bytes(data.tobytes())
    jobs = [(1000, None, (source, 7)), (70_000, lambda v: np.add(v, 1, out=v), (source, 0)), (5, None, None)]
    with HashingWriter(tmp_path / "out.bin", 71_005, budget=1 << 16) as writer:
        writer.fill_each(jobs)
    expected = data[7:1007].tobytes() + (data[:70_000] + 1).tobytes() + bytes(5)  # no source: zeros
    assert (tmp_path / "out.bin").read_bytes() == expected

    def fail(view):
        raise RuntimeError("compute failed")

    writer = HashingWriter(tmp_path / "bad.bin", 40 * 4096, budget=8 * 4096)
    with pytest.raises(RuntimeError, match="compute failed"):
        writer.fill_each(
            [(4096, None, (source, 0))] * 3 + [(4096, fail, (source, 0))] + [(4096, None, (source, 0))] * 36
        )
    writer.abort()
    assert writer._in_flight == 0  # what was read ahead went back
    writer = HashingWriter(tmp_path / "short.bin", 8192)
    with pytest.raises(Exception, match="ended early"):
        writer.fill_each([(4096, None, (source, 0)), (4096, None, (source, (1 << 20) - 10))])
    writer.abort()
    assert writer._in_flight == 0


def test_sources_are_read_directly_at_any_offset_up_to_their_end(tmp_path):
    if not staging.DIRECT:
        pytest.skip("no O_DIRECT on this platform")
    data = np.random.default_rng(4).integers(0, 256, 3 * 4096 + 123, dtype=np.uint8)
    source = tmp_path / "source.bin"
    source.write_bytes(data.tobytes())
    ranges = [(1, 4095), (4096, 4096), (4000, 200), (5, data.size - 5), (data.size - 3, 3)]
    total = sum(n for _, n in ranges)
    with HashingWriter(tmp_path / "out.bin", total, budget=1 << 16) as writer:
        writer.fill_each([(n, None, (source, at)) for at, n in ranges])
        assert writer._sources[source][1] is True  # still direct after every read
    assert (tmp_path / "out.bin").read_bytes() == b"".join(data[at : at + n].tobytes() for at, n in ranges)


def test_a_direct_read_refused_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    data = np.random.default_rng(5).integers(0, 256, 10_000, dtype=np.uint8)
    source = tmp_path / "source.bin"
    source.write_bytes(data.tobytes())
    monkeypatch.setattr(staging, "DIRECT", staging.DIRECT or 0o40000)
    opened = staging.os.open
    monkeypatch.setattr(staging.os, "open", lambda path, flags, *a: opened(path, flags & ~staging.DIRECT, *a))

    def refuse(fd, out, offset, path):
        raise OSError(22, "Invalid argument")  # as a file system taking O_DIRECT only at open

    monkeypatch.setattr(staging, "read_direct", refuse)
    monkeypatch.setattr(
        staging, "open_output", lambda p: (opened(p, stream.os.O_WRONLY | stream.os.O_CREAT), False)
    )
    monkeypatch.setattr(staging, "open_input", lambda p: (opened(p, stream.os.O_RDONLY), True))
    with HashingWriter(tmp_path / "out.bin", 9000) as writer:
        writer.copy(source, 11, 9000)
        assert writer._sources[source][1] is False
    assert (tmp_path / "out.bin").read_bytes() == data[11:9011].tobytes()


@pytest.mark.parametrize("size", [0, 1, 4096, (8 << 20) + 4097])
def test_sha256_file_reads_directly_and_agrees_with_hashlib(tmp_path, size, monkeypatch):
    from adaptrix.io import hashing

    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hashing.sha256_file(path) == expected

    def refuse(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(hashing, "_sha256_direct", refuse)
    monkeypatch.setattr(staging, "open_input", lambda p: (staging.os.open(p, staging.os.O_RDONLY), True))
    assert hashing.sha256_file(path) == expected  # the buffered fallback
