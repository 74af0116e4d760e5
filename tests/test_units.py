import pytest

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.units import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("256MB", 256_000_000), ("1.5GiB", int(1.5 * 1024**3)), ("4096", 4096), ("64 MiB", 64 * 1024**2),
    ("2k", 2000), (1234, 1234), ("128mb", 128_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "12 parsecs", "-5MB", "0", "1e3MB"])
def test_parse_size_rejects(bad):
    with pytest.raises(InputError):
        parse_size(bad)


def test_format_size():
    assert format_size(128 * 1024**2) == "128.0 MiB"
    assert format_size(512) == "512 B"
