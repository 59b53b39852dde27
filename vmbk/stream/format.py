"""The virtnbdbackup sparse stream format: constants, frame headers, metadata.

vmbk writes and reads the ``.data`` files of virtnbdbackup byte for byte,
so that a backup made by one tool restores with the other.  Everything
here was checked against virtnbdbackup's source (1.9.15 as packaged by
Debian, and upstream master) and against files it writes
(tests/integration/test_stream_compat.py).  In short::

    meta 0000000000000000 <len(json) as %016x>\\r\\n
    <meta json, json.dumps(indent=4)>\\r\\n
    data <offset %016x> <length %016x>\\r\\n  <payload> \\r\\n
    zero <offset %016x> <length %016x>\\r\\n          (no payload, no CRLF)
    ...
    stop 0000000000000000 0000000000000000\\r\\n
    -- compressed streams only: --
    <trailer json, e.g. [4408, 298, {"175408": [140312, 35096]}]>\\r\\n
    comp 0000000000000000 <len(trailer json) as %016x>\\r\\n

Every header is exactly 40 bytes: a 4-letter kind, a space, 16 lowercase
hex digits, a space, 16 hex digits, CRLF.  virtnbdbackup parses headers
with ``int(x, 16)``, which would also accept ``+1_0 `` and friends; vmbk
accepts only hex digits so that a corrupted header is reported, not
misread.

Stream versions (from virtnbdbackup's git history):

* version 1 (2020-11 .. 2021-05): no compression, no trailer; the meta
  carries ``virtualSize, dataSize, date, diskName, checkpointName,
  parentCheckpoint, incremental`` and the version under the key
  ``"stream-version"`` (renamed to ``"streamVersion"`` on 2021-05-18, one
  day before version 2 appeared; vmbk reads either spelling).
* version 2 (2021-05-19 ..): adds ``compressed`` (``false`` or the lz4
  level, an int, 2 by default) and ``compressionMethod`` (``"lz4"``, written
  even when not compressed) and the compression trailer.  ``diskFormat``
  was added on 2022-02-24 *without* a version bump, so version-2 streams
  without ``diskFormat`` exist too.

Zero frames: virtnbdbackup writes them only in full/copy backups (for the
holes of the disk) and never in incrementals; virtnbdrestore skips them.
Since 2.21 (2025) its incrementals also leave out dirty ranges that are
no longer allocated (discarded/trimmed in the guest: block status
"hole"), so its restore keeps the parent's stale bytes there.  vmbk writes zero frames for such ranges in
its incrementals (an extension virtnbdrestore ignores harmlessly) and
applies them on restore.

virtnbdrestore decides "compressed" as ``streamVersion == 2 and
compressed is not False`` -- so ``"compressed": 0`` means compressed
(lz4 level 0).  :attr:`StreamMeta.is_compressed` follows the same rule.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vmbk.errors import Exit, VmbkError

# -- constants --------------------------------------------------------------

KIND_META = "meta"
KIND_DATA = "data"
KIND_ZERO = "zero"
KIND_STOP = "stop"
KIND_COMP = "comp"
KINDS = frozenset({KIND_META, KIND_DATA, KIND_ZERO, KIND_STOP, KIND_COMP})

TERM = b"\r\n"
#: Length of every frame header, CRLF included.
FRAME_LEN = 40

#: NBD's maximum request size as qemu-nbd/qemu advertise it (32 MiB).
#: virtnbdbackup splits a compressed data frame into lz4 pieces, and writes
#: the ``{"total": [pieces]}`` trailer form, exactly when the frame's length
#: is ``>=`` the restoring NBD server's maximum request size, which is this
#: value for every server virtnbdrestore talks to.  The threshold is
#: therefore part of the format, not a tuning knob.
MAX_REQUEST_SIZE = 32 * 1024 * 1024

#: Upper bound for the uncompressed size of one lz4 piece that vmbk will
#: decompress.  virtnbdbackup's pieces are at most MAX_REQUEST_SIZE (a
#: frame that is not split is smaller than that, a split frame is cut at
#: it); the bound keeps a hostile stream from making us allocate gigabytes.
MAX_PIECE_SIZE = 2 * MAX_REQUEST_SIZE

#: Largest meta JSON vmbk accepts (virtnbdbackup's is about 350 bytes).
MAX_META_LEN = 1024 * 1024

STREAM_VERSION = 2
COMPRESSION_METHOD = "lz4"
#: virtnbdbackup's ``-z`` without a value.
DEFAULT_COMPRESSION_LEVEL = 2

_HEX = b"0123456789abcdefABCDEF"


# -- errors -----------------------------------------------------------------


class StreamError(VmbkError):
    """A stream file is malformed, truncated or inconsistent.

    Every instance names the file and the byte offset in it where the
    problem was found, so that an operator can look at the bytes
    (``xxd -s OFFSET``) and so that error records are actionable.
    """

    code = Exit.STORAGE
    kind = "stream"

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: int,
        detail: str,
        *,
        vm: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.offset = offset
        self.detail = detail
        super().__init__(f"{self.path}: at byte {offset}: {detail}", vm=vm)


# -- headers ----------------------------------------------------------------


def pack_header(kind: str, start: int, length: int) -> bytes:
    """The 40-byte header of a frame (``b"data 0000...0000 0000...1000\\r\\n"``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r}")
    if not (0 <= start < 1 << 64 and 0 <= length < 1 << 64):
        raise ValueError(f"header field out of range: start={start} length={length}")
    return b"%s %016x %016x\r\n" % (kind.encode("ascii"), start, length)


def parse_header(raw: bytes, *, path: str | os.PathLike[str], pos: int) -> tuple[str, int, int]:
    """``(kind, start, length)`` of a 40-byte header read at ``pos`` of ``path``.

    Strict: exact length, separators, hex digits and a known kind;
    anything else is a :class:`StreamError` pointing at ``pos``.
    """
    if len(raw) != FRAME_LEN:
        raise StreamError(path, pos, f"truncated frame header: {len(raw)} of {FRAME_LEN} bytes")
    if raw[4:5] != b" " or raw[21:22] != b" " or raw[38:40] != TERM:
        raise StreamError(path, pos, f"malformed frame header {raw!r}")
    kind_b = raw[0:4]
    start_b = raw[5:21]
    length_b = raw[22:38]
    if start_b.translate(None, _HEX) or length_b.translate(None, _HEX):
        raise StreamError(path, pos, f"non-hex number in frame header {raw!r}")
    try:
        kind = kind_b.decode("ascii")
    except UnicodeDecodeError:
        kind = ""
    if kind not in KINDS:
        raise StreamError(path, pos, f"unknown frame kind {kind_b!r}")
    return kind, int(start_b, 16), int(length_b, 16)


# -- metadata ---------------------------------------------------------------

#: Keys virtnbdbackup writes, in the order it writes them.
#: vmbk's meta key: who wrote the stream (see `StreamMeta`).
WRITTEN_BY_KEY = "writtenBy"
#: vmbk's meta key: the stream's restore point has a manifest (`vmbk.manifest`),
#: so a point without one was tampered with, or never committed.
MANIFEST_KEY = "vmbkManifest"

_KNOWN_KEYS = (
    "virtualSize",
    "dataSize",
    "date",
    "diskName",
    "diskFormat",
    "checkpointName",
    "compressed",
    "compressionMethod",
    "parentCheckpoint",
    "incremental",
    "streamVersion",
)
_LEGACY_VERSION_KEY = "stream-version"


def _now_iso() -> str:
    return datetime.datetime.now().isoformat()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(slots=True)
class StreamMeta:
    """The JSON payload of the ``meta`` frame.

    ``compressed`` is ``False`` or the lz4 level (virtnbdbackup writes the
    level, e.g. ``2``; ``True`` from old versions is accepted).  Optional
    keys that a stream did not carry are ``None`` and are not written back.
    Keys vmbk does not know are kept in ``extra`` and written back after
    the known ones, so a round trip through vmbk loses nothing.

    ``writtenBy`` is vmbk's one addition (``"vmbk 0.1.0"``; virtnbdrestore
    ignores keys it does not know): a stream vmbk wrote always has its
    ``.chksum``, so a missing one is a finding even when every file of the
    chain lost it (`WRITTEN_BY_KEY`, `written_by_vmbk`).
    """

    virtual_size: int
    data_size: int
    disk_name: str
    disk_format: str | None = "qcow2"
    checkpoint_name: str | bool | None = ""
    parent_checkpoint: str | bool | None = ""
    incremental: bool = False
    compressed: bool | int | None = False
    compression_method: str | None = COMPRESSION_METHOD
    stream_version: int = STREAM_VERSION
    date: str = field(default_factory=_now_iso)
    extra: dict[str, Any] = field(default_factory=dict)
    #: The stream spelled the version ``"stream-version"`` (early version 1).
    legacy_version_key: bool = field(default=False, repr=False)

    @property
    def is_compressed(self) -> bool:
        """virtnbdrestore's rule: version 2 and ``compressed is not False``."""
        return (
            self.stream_version >= 2
            and self.compressed is not False
            and self.compressed is not None
        )

    @property
    def compression_level(self) -> int:
        """The lz4 level to compress with (``True`` means the default)."""
        if self.compressed is True:
            return DEFAULT_COMPRESSION_LEVEL
        if self.compressed is False or self.compressed is None:
            raise ValueError("stream is not compressed")
        return int(self.compressed)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in virtnbdbackup's order."""
        values: dict[str, Any] = {
            "virtualSize": self.virtual_size,
            "dataSize": self.data_size,
            "date": self.date,
            "diskName": self.disk_name,
            "diskFormat": self.disk_format,
            "checkpointName": self.checkpoint_name,
            "compressed": self.compressed,
            "compressionMethod": self.compression_method,
            "parentCheckpoint": self.parent_checkpoint,
            "incremental": self.incremental,
        }
        out = {k: v for k, v in values.items() if v is not None}
        out[_LEGACY_VERSION_KEY if self.legacy_version_key else "streamVersion"] = (
            self.stream_version
        )
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    @property
    def with_manifest(self) -> bool:
        """The writer made a manifest for the stream's point (`MANIFEST_KEY`)."""
        return self.extra.get(MANIFEST_KEY) == 1

    @property
    def written_by_vmbk(self) -> bool:
        w = self.extra.get(WRITTEN_BY_KEY)
        return isinstance(w, str) and w.split(" ", 1)[0] == "vmbk"

    def to_json(self) -> bytes:
        """Encoded exactly as virtnbdbackup does (``json.dumps(indent=4)``)."""
        return json.dumps(self.to_dict(), indent=4).encode("utf-8")

    @classmethod
    def from_json(
        cls, raw: bytes, *, path: str | os.PathLike[str] = "<meta>", pos: int = 0
    ) -> StreamMeta:
        """Parse and validate a meta payload that starts at ``pos`` of ``path``."""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise StreamError(path, pos, f"meta frame is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise StreamError(path, pos, "meta frame is not a JSON object")
        return cls.from_dict(obj, path=path, pos=pos)

    @classmethod
    def from_dict(
        cls,
        obj: dict[str, Any],
        *,
        path: str | os.PathLike[str] = "<meta>",
        pos: int = 0,
    ) -> StreamMeta:
        def bad(msg: str) -> StreamError:
            return StreamError(path, pos, f"meta frame: {msg}")

        for key in ("virtualSize", "dataSize"):
            if key not in obj:
                raise bad(f"missing {key!r}")
            if not _is_int(obj[key]) or obj[key] < 0:
                raise bad(f"{key!r} is not a non-negative integer: {obj[key]!r}")
        legacy = "streamVersion" not in obj and _LEGACY_VERSION_KEY in obj
        version = obj.get(_LEGACY_VERSION_KEY if legacy else "streamVersion")
        if version is None:
            raise bad("missing 'streamVersion'")
        if not _is_int(version) or version not in (1, 2):
            raise bad(f"unsupported stream version {version!r}")
        if obj["dataSize"] > obj["virtualSize"]:
            raise bad(f"dataSize {obj['dataSize']} is larger than virtualSize {obj['virtualSize']}")
        disk_name = obj.get("diskName")
        if not isinstance(disk_name, str):
            raise bad(f"'diskName' is not a string: {disk_name!r}")
        disk_format = obj.get("diskFormat")
        if disk_format is not None and not isinstance(disk_format, str):
            raise bad(f"'diskFormat' is not a string: {disk_format!r}")
        compressed = obj.get("compressed", False)
        if not (isinstance(compressed, bool) or _is_int(compressed) or compressed is None):
            raise bad(f"'compressed' is neither false nor a level: {compressed!r}")
        method = obj.get("compressionMethod")
        if method is not None and not isinstance(method, str):
            raise bad(f"'compressionMethod' is not a string: {method!r}")
        for key in ("checkpointName", "parentCheckpoint"):
            v = obj.get(key)
            if v is not None and not isinstance(v, (str, bool)):
                raise bad(f"{key!r} is not a string: {v!r}")
        incremental = obj.get("incremental", False)
        if not isinstance(incremental, bool):
            raise bad(f"'incremental' is not a boolean: {incremental!r}")
        date = obj.get("date", "")
        if not isinstance(date, str):
            raise bad(f"'date' is not a string: {date!r}")
        meta = cls(
            virtual_size=obj["virtualSize"],
            data_size=obj["dataSize"],
            disk_name=disk_name,
            disk_format=disk_format,
            checkpoint_name=obj.get("checkpointName"),
            parent_checkpoint=obj.get("parentCheckpoint"),
            incremental=incremental,
            compressed=compressed if "compressed" in obj else None,
            compression_method=method,
            stream_version=version,
            date=date,
            extra={
                k: v for k, v in obj.items() if k not in _KNOWN_KEYS and k != _LEGACY_VERSION_KEY
            },
            legacy_version_key=legacy,
        )
        if meta.is_compressed and method not in (None, COMPRESSION_METHOD):
            raise bad(f"unsupported compression method {method!r}")
        return meta
