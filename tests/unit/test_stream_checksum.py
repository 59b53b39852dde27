"""The fast adler32 is exactly zlib's: .chksum files stay virtnbdbackup's."""

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from vmbk.stream.checksum import IMPLEMENTATION, adler32


def test_zlib_ng_is_in_use_when_installed():
    try:
        import zlib_ng  # noqa: F401
    except ImportError:
        assert IMPLEMENTATION == "zlib"
    else:
        assert IMPLEMENTATION == "zlib-ng"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300_000), st.integers(0, 65520), st.integers(0, 65520))
def test_same_value_as_zlib(data, a, b):
    # A running value is always a valid adler32 (both halves below 65521);
    # that is the only kind of seed the writer and reader pass on.
    seed = (b << 16) | a
    assert adler32(data, seed) == zlib.adler32(data, seed)
    assert adler32(memoryview(data), seed) == zlib.adler32(data, seed)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=5000), st.binary(max_size=5000), st.integers(0, 200_000))
def test_combine_is_the_checksum_of_the_concatenation(x, y, zeros):
    from vmbk.stream.checksum import adler32_combine

    y = y + bytes(zeros)  # long pieces: len(y) beyond the modulus
    assert adler32_combine(zlib.adler32(x), zlib.adler32(y), len(y)) == zlib.adler32(x + y)
    assert adler32_combine(zlib.adler32(x), 1, 0) == zlib.adler32(x)
