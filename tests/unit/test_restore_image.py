"""The restore's writers: chain -> qcow2 (vmbk.restore.qcow2) or raw, lz4 fast path, checksums alongside.

Every image is compared with what `reconstruct_raw` (the stream package's
own reference) makes of the same chain, by ``qemu-img compare``, and
checked by ``qemu-img check``: QEMU is the judge of the qcow2 format.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import lz4.frame
import pytest

from vmbk.restore import image, qcow2
from vmbk.stream.chainread import ChainImage
from vmbk.stream.lz4read import Lz4Reader
from vmbk.stream import StreamError, StreamMeta, StreamReader, StreamWriter, reconstruct_raw, scan
from vmbk.stream import writer as writer_mod

KiB, MiB = 1024, 1024 * 1024


def text(n: int, rnd: random.Random) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"restore", b"cluster", b"\n"]
    out = b" ".join(rnd.choice(words) for _ in range(n // 4 + 1))
    return out[:n]


def make_chain(tmp: Path, seed: int, size: int, *, streams: int = 3, compressed: int | bool = False,
               big: int = 0, piece_size: int | None = None) -> list[Path]:
    """A chain of ``streams`` streams with random data, text, zero payloads and zero frames.

    Offsets and lengths are 512-byte multiples, so clusters are often cut
    by frames of several streams.  ``big``: one extra data frame of that
    many bytes in the full (several lz4 pieces when compressed).
    """
    rnd = random.Random(seed)
    paths = []
    for i in range(streams):
        frames: list[tuple[int, int, bytes | None]] = []
        pos = 0
        if i == 0 and big:
            frames.append((0, big, rnd.randbytes(big // 2) + text(big - big // 2, rnd)))
            pos = big
        while True:
            pos += rnd.randrange(0, 64) * 512
            length = rnd.randrange(1, 200) * 512
            if pos + length > size:
                break
            kind = rnd.random()
            if kind < 0.35:
                payload: bytes | None = rnd.randbytes(length)
            elif kind < 0.55:
                payload = text(length, rnd)
            elif kind < 0.7:
                payload = bytes(length)  # data that is zero: must not be allocated
            elif kind < 0.8:
                payload = bytes(length // 2) + rnd.randbytes(length - length // 2)
            else:
                payload = None  # a zero frame
            frames.append((pos, length, payload))
            pos += length
        p = tmp / f"s{seed}-{i}.data"
        meta = StreamMeta(virtual_size=size, data_size=sum(n for _, n, d in frames if d is not None),
                          disk_name="vda", compressed=compressed, incremental=i > 0)
        with StreamWriter(p, meta, **({"piece_size": piece_size} if piece_size else {})) as w:
            for off, n, payload in frames:
                if payload is None:
                    w.write_zero(off, n)
                else:
                    w.write_data(off, payload)
        p.with_name(p.name + ".chksum").write_text(str(w.checksum))
        paths.append(p)
    return paths


def qemu_img(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, argv)], capture_output=True, text=True, check=check)


def nonzero_units(raw: Path, unit: int) -> int:
    data = raw.read_bytes()
    return sum(1 for u in range(0, len(data), unit) if any(data[u:u + unit]))


def assert_qcow2_of(img: Path, paths: list[Path], tmp: Path, cluster: int) -> dict:
    ref = tmp / "ref.raw"
    reconstruct_raw(paths, ref)
    assert qemu_img("compare", "-f", "qcow2", "-F", "raw", img, ref, check=False).returncode == 0
    chk = json.loads(qemu_img("check", "--output=json", img).stdout)
    assert chk.get("leaks", 0) == 0 and chk.get("corruptions", 0) == 0 and chk["check-errors"] == 0
    assert chk["allocated-clusters"] == nonzero_units(ref, cluster)  # thin: zero clusters stay holes
    info: dict = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["virtual-size"] == scan(paths[-1]).meta.virtual_size and info["cluster-size"] == cluster
    return info


@pytest.mark.parametrize("seed, size, options", [
    (1, 3 * MiB + 7 * 512, ()),
    (2, 4 * MiB, ("compat=0.10",)),
    (3, 2 * MiB + 512, ("compat=1.1", "cluster_size=4096", "lazy_refcounts=on")),
    (4, 5 * MiB, ("cluster_size=2097152",)),
    (5, 1 * MiB + 512, ("cluster_size=512", "compat=0.10")),
])
def test_qcow2_is_the_chain_thin_and_checked(tmp_path, seed, size, options):
    paths = make_chain(tmp_path, seed, size)
    img = tmp_path / "out.qcow2"
    image.write_qcow2(paths, img, options)
    opts = qcow2.ImageOptions.parse(options)
    info = assert_qcow2_of(img, paths, tmp_path, opts.cluster_size)
    spec = info["format-specific"]["data"]
    assert spec["compat"] == ("0.10" if opts.version == 2 else "1.1")
    assert spec.get("lazy-refcounts", False) == opts.lazy_refcounts


def test_many_metadata_clusters(tmp_path):
    """512-byte clusters over 12 MiB: 90+ L2 tables, 100+ refcount blocks, a refcount table of 2 clusters."""
    paths = [tmp_path / "full.data"]
    rnd = random.Random(9)
    size = 12 * MiB
    meta = StreamMeta(virtual_size=size, data_size=size - MiB, disk_name="vda")
    with StreamWriter(paths[0], meta) as w:
        w.write_data(0, rnd.randbytes(size - MiB))
    img = tmp_path / "out.qcow2"
    image.write_qcow2(paths, img, ("cluster_size=512",))
    assert_qcow2_of(img, paths, tmp_path, 512)


@pytest.mark.parametrize("settings", [
    {},  # vmbk's and virtnbdbackup's: checksums, linked 64 KiB blocks, content size
    {"block_checksum": False, "content_checksum": False},
    {"block_size": lz4.frame.BLOCKSIZE_MAX4MB, "block_linked": False},
    {"store_size": False},  # no content size: the StreamReader fallback
])
def test_compressed_chains_restore_the_same(tmp_path, monkeypatch, settings):
    def compress(data, level):
        args = {"compression_level": level, "content_checksum": True, "block_checksum": True, "store_size": True}
        return lz4.frame.compress(data, **(args | settings))

    monkeypatch.setattr(writer_mod, "compress_piece", compress)
    monkeypatch.setattr(writer_mod, "MAX_REQUEST_SIZE", 256 * KiB)  # split frames into pieces
    paths = make_chain(tmp_path, 11, 6 * MiB, compressed=2, big=MiB + 4096, piece_size=256 * KiB)
    assert any(len(f.pieces) > 1 for f in scan(paths[0]).frames)
    img = tmp_path / "out.qcow2"
    image.write_qcow2(paths, img)
    assert_qcow2_of(img, paths, tmp_path, 64 * KiB)


def test_lz4_reader_reads_any_range(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "MAX_REQUEST_SIZE", 128 * KiB)
    (path,) = make_chain(tmp_path, 12, 4 * MiB, streams=1, compressed=2, big=MiB, piece_size=128 * KiB)
    smap = scan(path)
    rnd = random.Random(3)
    with StreamReader(path, smap) as sr:
        z = Lz4Reader(sr)
        try:
            for frame in smap.data_frames:
                for _ in range(6):
                    a = rnd.randrange(frame.length)
                    b = rnd.randrange(a, frame.length) + 1
                    out = bytearray(b - a)
                    z.read_into(frame, a, memoryview(out))
                    assert bytes(out) == sr.read_frame(frame, a, b - a)
        finally:
            z.close()


def test_corrupt_lz4_is_a_stream_error(tmp_path):
    (path,) = make_chain(tmp_path, 13, 2 * MiB, streams=1, compressed=2)
    frame = max(scan(path).data_frames, key=lambda f: f.length)
    with open(path, "r+b") as f:  # the block length word of the first block: garbage
        f.seek(frame.file_pos + 7 + 8)
        f.write(b"\x7f\xff\xff\x00")
    with pytest.raises(StreamError):
        image.write_qcow2([path], tmp_path / "out.qcow2")


def test_raw_is_the_chain_with_holes(tmp_path):
    paths = make_chain(tmp_path, 21, 3 * MiB + 512)
    out, ref = tmp_path / "out.raw", tmp_path / "ref.raw"
    image.write_raw(paths, out)
    reconstruct_raw(paths, ref)
    assert out.read_bytes() == ref.read_bytes()
    assert out.stat().st_blocks * 512 <= nonzero_units(ref, image.RAW_UNIT) * image.RAW_UNIT


def test_runs_are_nonzero_whole_units_in_order(tmp_path):
    paths = make_chain(tmp_path, 22, 3 * MiB)
    ref = tmp_path / "ref.raw"
    reconstruct_raw(paths, ref)
    expected = ref.read_bytes()
    seen = bytearray(len(expected) + 4 * KiB)
    last = -1
    with ChainImage(paths) as img:
        for off, view in img.runs(4 * KiB, window=64 * KiB):
            assert off % (4 * KiB) == 0 and view.nbytes % (4 * KiB) == 0 and off > last
            assert all(any(view[u:u + 4 * KiB]) for u in range(0, view.nbytes, 4 * KiB))
            seen[off:off + view.nbytes] = view
            last = off
    assert bytes(seen[:len(expected)]) == expected


# -- build: checksums checked alongside, nothing left on failure ---------------------------------


def job_for(paths: list[Path], target: Path) -> image.DiskRestore:
    return image.DiskRestore("vda", tuple(paths), target, 0, 0, ("cluster_size=65536",))


def test_build_with_verify_reports_streams_without_chksum(tmp_path):
    paths = make_chain(tmp_path, 31, 2 * MiB)
    Path(f"{paths[1]}.chksum").unlink()
    job = job_for(paths, tmp_path / "o" / "vda.qcow2")
    job.target.parent.mkdir()
    built = image.build(job, verify=True)
    assert built.unchecked == (paths[1],)
    image.commit([job])
    assert_qcow2_of(job.target, paths, tmp_path, 64 * KiB)


@pytest.mark.parametrize("where", ["payload", "trailer"])
def test_build_with_verify_fails_on_a_bad_checksum_and_leaves_nothing(tmp_path, where):
    paths = make_chain(tmp_path, 32, 2 * MiB, compressed=2 if where == "trailer" else False)
    victim = paths[1]
    smap = scan(victim)
    pos = smap.data_frames[0].file_pos + 3 if where == "payload" else smap.file_size - 50
    data = bytearray(victim.read_bytes())
    data[pos] ^= 0x01
    victim.write_bytes(data)
    job = job_for(paths, tmp_path / "o" / "vda.qcow2")
    job.target.parent.mkdir()
    with pytest.raises(StreamError, match="adler32|chksum|trailer|lz4"):
        image.build(job, verify=True)
    assert os.listdir(job.target.parent) == []


def test_build_with_verify_stops_the_check_on_failure(tmp_path, monkeypatch):
    paths = make_chain(tmp_path, 33, 2 * MiB)
    job = job_for(paths, tmp_path / "o" / "vda.qcow2")
    job.target.parent.mkdir()

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(image, "write_qcow2", boom)
    with pytest.raises(KeyboardInterrupt):
        image.build(job, verify=True)
    assert os.listdir(job.target.parent) == []


def test_options_parse():
    assert qcow2.ImageOptions.parse(()) == qcow2.ImageOptions(3, 16, False)
    assert qcow2.ImageOptions.parse(("compat=0.10", "lazy_refcounts=on")) == qcow2.ImageOptions(2, 16, False)
    for bad in ("cluster_size=1000", "cluster_size=4194304", "compat=2.0", "preallocation=full"):
        with pytest.raises(ValueError):
            qcow2.ImageOptions.parse((bad,))


def test_writer_refuses_out_of_order_and_partial_clusters(tmp_path):
    fd = os.open(tmp_path / "x.qcow2", os.O_RDWR | os.O_CREAT)
    try:
        w = qcow2.Writer(fd, 4 * MiB, qcow2.ImageOptions())
        w.write(MiB, memoryview(b"\1" * 65536))
        with pytest.raises(ValueError):
            w.write(0, memoryview(b"\1" * 65536))
        with pytest.raises(ValueError):
            w.write(2 * MiB, memoryview(b"\1" * 512))
        with pytest.raises(ValueError):
            w.write(4 * MiB, memoryview(b"\1" * 65536))
    finally:
        os.close(fd)
