import pytest

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.units import format_min_size, format_size, parse_size


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


def test_a_minimum_is_shown_rounded_up():
    """'memory budget 50.4 MiB is below the minimum this bundle can run in: 50.4 MiB' (SmolLM2 int4 rerank, minimum
    50.43 MiB): a minimum rounded to nearest was refused when given back; rounded up, its figure works."""
    for n in [1, 999, 1023, 1025, 52_880_000, 76_235_671, 45_080_870, 1024**3 + 1, 5 * 1024**3 - 7]:
        shown = format_min_size(n)
        assert parse_size(shown.replace(" ", "")) >= n, (n, shown)
        assert parse_size(shown.replace(" ", "")) - n <= 0.11 * 1024 ** ("BKMG".index(shown.split()[1][0])), (n, shown)
    assert format_min_size(50 * 1024**2) == "50.0 MiB" == format_size(50 * 1024**2)  # exact figures stay as they are


def test_the_refusals_minimum_opens(llama_bundle):
    from edge_sel.runtime import Reranker
    from edge_sel.runtime.errors import BudgetError

    with pytest.raises(BudgetError) as e:
        Reranker(llama_bundle, memory_budget="1KB")
    shown = str(e.value).split("can run in: ")[1].split(" (")[0]
    Reranker(llama_bundle, memory_budget=shown.replace(" ", "")).close()
