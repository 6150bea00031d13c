"""Resource vectors: arithmetic, validation and people's units."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from packsched import GiB, InvalidSpecError, MiB, Requirements, Resources
from packsched.resources import parse_bytes, parse_cpu

amounts = st.floats(min_value=0, max_value=1e6, allow_nan=False)
vectors = st.builds(
    Resources,
    cpu=amounts,
    mem=st.integers(0, 2**50),
    disk=st.integers(0, 2**50),
    gpu=st.integers(0, 64),
    extra=st.dictionaries(st.sampled_from(["fpga", "licence"]), amounts, max_size=2),
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * GiB),
        ("512Mi", 512 * MiB),
        ("1.5G", 1_500_000_000),
        ("1000", 1000),
        (2, 2),
        ("1kb", 1000),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    """Byte quantities parse with decimal and binary suffixes."""
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("500m", 0.5), (2, 2.0), ("1.5", 1.5), ("250m", 0.25)]
)
def test_parse_cpu(text: str | int, expected: float) -> None:
    """Cpu quantities parse as cores or millicores."""
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("bad", ["4 furlongs", "-1G", "", "GiB", "nan", "1e999"])
def test_parse_bytes_rejects_naming_value(bad: str) -> None:
    """A bad quantity is rejected with the value and the field in the message."""
    with pytest.raises(InvalidSpecError) as info:
        parse_bytes(bad, field="mem")
    assert "mem" in str(info.value) and repr(bad) in str(info.value)


def test_parse_builds_vector() -> None:
    """Resources.parse takes people's units for every field."""
    r = Resources.parse(cpu="500m", mem="4GiB", disk="1.5G", gpu=1, extra={"fpga": "2"})
    assert r == Resources(cpu=0.5, mem=4 * GiB, disk=1_500_000_000, gpu=1, extra={"fpga": 2.0})
    with pytest.raises(InvalidSpecError, match="gpu"):
        Resources.parse(gpu="1.5")


@pytest.mark.parametrize(
    "bad", [{"cpu": -1}, {"cpu": math.nan}, {"cpu": math.inf}, {"mem": -5}, {"gpu": -1}]
)
def test_construction_rejects_negative_and_non_finite(bad: dict[str, float]) -> None:
    """Negative, NaN and infinite amounts are refused on construction."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        Resources(**bad)  # type: ignore[arg-type]


def test_decode_keeps_path() -> None:
    """Decoding a bad vector names the path."""
    with pytest.raises(msgspec.ValidationError, match=r"\$\.min"):
        msgspec.json.decode(b'{"min": {"cpu": -2}}', type=Requirements)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"cpu": 1, "ram": 2}', type=Resources)


@given(vectors, vectors)
def test_add_then_subtract_round_trips(a: Resources, b: Resources) -> None:
    """(a + b) - b == a in every dimension, within float tolerance."""
    back = (a + b) - b
    assert math.isclose(back.cpu, a.cpu, rel_tol=1e-9, abs_tol=1e-6)
    assert (back.mem, back.disk, back.gpu) == (a.mem, a.disk, a.gpu)
    assert a.fits_in(a + b) and b.fits_in(a + b)


@given(vectors, vectors)
def test_max_is_an_upper_bound(a: Resources, b: Resources) -> None:
    """a and b both fit in their per-dimension maximum, and it is the least such vector."""
    m = a.max(b)
    assert a.fits_in(m) and b.fits_in(m)
    assert a.min(b).fits_in(a)


def test_subtract_clamps_and_shares() -> None:
    """Subtraction never goes negative; shares are per dimension, inf where capacity lacks it."""
    assert Resources(cpu=1) - Resources(cpu=2) == Resources()
    cap = Resources(cpu=4, mem=8 * GiB)
    shares = Resources(cpu=1, mem=6 * GiB, gpu=1).shares(cap)
    assert shares["cpu"] == 0.25 and shares["mem"] == 0.75 and shares["gpu"] == math.inf
    assert Resources(cpu=2, mem=1 * GiB).dominant_share(cap) == 0.5
    assert Resources(gpu=1).exceeding(cap) == ["gpu"]


def test_extra_dimensions_fit() -> None:
    """Extra named resources count when fitting."""
    assert not Resources(extra={"fpga": 1}).fits_in(Resources(cpu=8))
    assert Resources(extra={"fpga": 1}).fits_in(Resources(extra={"fpga": 2}))


def test_requirements_full_size() -> None:
    """A request counts at min * (1 + width)."""
    r = Requirements(min=Resources(cpu=2, mem=1 * GiB), width=3)
    assert r.full == Resources(cpu=8, mem=4 * GiB)
    with pytest.raises(ValueError, match="width"):
        Requirements(min=Resources(), width=-1)
