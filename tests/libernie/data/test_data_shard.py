"""The shard format of docs/formats/shards.md: golden bytes, round trip, dtype rule, and every refusal."""
import struct

import numpy as np
import pytest

from libernie.data import FLAG_CONTINUED, ROLE_CHOSEN, ROLE_DOC, ROLE_PROMPT, ROLE_REJECTED, ShardIndex, ShardWriter
from libernie.data.shard import npy_header, token_dtype
from libernie.errors import ShardFormatError


def write_two(base, dtype=np.dtype("<u2")):
    w = ShardWriter(base, "dpo", 8, dtype)
    w.open()
    w.add(np.array([5, 6, 7, 8, 9]), [(0, ROLE_PROMPT), (3, ROLE_CHOSEN), (4, ROLE_REJECTED)], [(3, 1), (4, 1)])
    w.add(np.array([1, 2, 3]), [(0, ROLE_DOC | FLAG_CONTINUED)], [(0, 3)])
    w.publish(w.finish())
    return w


def test_idx_golden_bytes(tmp_path):
    write_two(tmp_path / "s-00000")
    data = (tmp_path / "s-00000.idx").read_bytes()
    # Written out by hand from the spec table: header, then seq_offsets, seq_segments, seq_runs, runs,
    # seg_starts, seg_flags.
    header = (b"ERNPACK\x00" + (1).to_bytes(4, "little") + bytes([2, 2]) + b"\x00\x00"
              + (8).to_bytes(4, "little") + b"\x00" * 4
              + (2).to_bytes(8, "little") + (4).to_bytes(8, "little") + (3).to_bytes(8, "little")
              + (8).to_bytes(8, "little") + b"\x00" * 8)
    assert data[:64] == header
    q = lambda *xs: b"".join(x.to_bytes(8, "little") for x in xs)  # noqa: E731
    i = lambda *xs: b"".join(x.to_bytes(4, "little") for x in xs)  # noqa: E731
    body = (q(0, 5, 8) + q(0, 3, 4) + q(0, 2, 3) + i(3, 1, 4, 1, 0, 3) + i(0, 3, 4, 0)
            + bytes([1, 2, 3, 0x80]))
    assert data[64:] == body
    assert len(data) == 64 + 24 * 3 + 8 * 3 + 5 * 4


def test_npy_header_is_128_bytes_and_numpy_reads_it(tmp_path):
    write_two(tmp_path / "s-00000")
    raw = (tmp_path / "s-00000.npy").read_bytes()
    assert raw[:8] == b"\x93NUMPY\x01\x00" and struct.unpack("<H", raw[8:10])[0] == 118 and raw[127:128] == b"\n"
    assert raw[128:] == np.array([5, 6, 7, 8, 9, 1, 2, 3], dtype="<u2").tobytes()
    arr = np.load(tmp_path / "s-00000.npy", mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr.tolist() == [5, 6, 7, 8, 9, 1, 2, 3]
    assert len(npy_header(np.dtype("<u4"), 2**62)) == 128


def test_index_round_trip(tmp_path):
    write_two(tmp_path / "s-00000")
    idx = ShardIndex(tmp_path / "s-00000.idx")
    assert (idx.mode, idx.seq_len, idx.itemsize, idx.num_sequences, idx.num_tokens) == ("dpo", 8, 2, 2, 8)
    start, end, starts, flags, runs = idx.sequence(1)
    assert (start, end, starts.tolist(), flags.tolist(), runs.tolist()) == (5, 8, [0], [0x80], [[0, 3]])


def test_dtype_rule_and_uint32_shard(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32 and token_dtype(103424) == np.uint32
    w = ShardWriter(tmp_path / "big", "pretrain", 4, token_dtype(103424))
    w.open()
    w.add(np.array([103423, 70000, 2]), [(0, ROLE_DOC)], [(0, 3)])
    w.publish(w.finish())
    assert np.load(tmp_path / "big.npy").tolist() == [103423, 70000, 2]
    assert ShardIndex(tmp_path / "big.idx").itemsize == 4


def test_writer_refuses_what_does_not_fit(tmp_path):
    w = ShardWriter(tmp_path / "x", "pretrain", 4, np.dtype("<u2"))
    w.open()
    with pytest.raises(ShardFormatError, match="token id outside"):
        w.add(np.array([65536]), [(0, 0)], [(0, 1)])
    with pytest.raises(ShardFormatError, match="expected 1..4"):
        w.add(np.arange(5), [(0, 0)], [(0, 5)])
    with pytest.raises(ShardFormatError, match="bad segment"):
        w.add(np.arange(3), [(0, 0), (0, 0)], [])
    with pytest.raises(ShardFormatError, match="bad loss run"):
        w.add(np.arange(3), [(0, 0)], [(1, 3)])
    with pytest.raises(ShardFormatError, match="empty shard"):
        w.finish()
    with pytest.raises(ShardFormatError, match="seq_len"):
        ShardWriter(tmp_path / "y", "pretrain", 2**32, np.dtype("<u4"))


def test_temp_names_until_published(tmp_path):
    w = ShardWriter(tmp_path / "t", "pretrain", 4, np.dtype("<u2"))
    with pytest.raises(RuntimeError):
        with w:
            w.add(np.array([1, 2]), [(0, 0)], [(0, 2)])
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy.tmp"]
    with w.__class__(tmp_path / "u", "pretrain", 4, np.dtype("<u2")) as w2:
        w2.add(np.array([1, 2]), [(0, 0)], [(0, 2)])
    assert (tmp_path / "u.npy").exists() and (tmp_path / "u.idx").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"MMIDIDX\x00\x00" + b[9:], "bad magic"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version 2"),
    (lambda b: b[:-1], "header implies"),
    (lambda b: b[:10], "shorter than the 64-byte header"),
    (lambda b: b[:64] + (7).to_bytes(8, "little") + b[72:], "seq_offsets"),  # seq_offsets[0] != 0
    (lambda b: b[:-4] + bytes([1, 2, 3, 0x40]), "flags"),
])
def test_reader_refuses_corrupt_index(tmp_path, damage, message):
    write_two(tmp_path / "s")
    p = tmp_path / "s.idx"
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(ShardFormatError, match=message):
        ShardIndex(p)
