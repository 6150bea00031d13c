"""Resource vectors, alloc requests and unit parsing.

A `Resources` is a point in a space of named dimensions: `cpu` (cores, fractional), `mem` and
`disk` (bytes), `gpu` (whole devices) and any number of `extra` named floats. Every packing
decision in packsched is arithmetic on these vectors, so they are immutable, validated on
construction and on decode, and never negative.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from .errors import InvalidSpecError

__all__ = [
    "AllocShape",
    "GiB",
    "KiB",
    "MiB",
    "PiB",
    "Requirements",
    "Resources",
    "TiB",
    "parse_bytes",
    "parse_cpu",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5

# A tolerance for float dimensions: sums of fractional cores (0.1 + 0.2) must not make a
# task look one ulp too large for the room that was computed for it.
_EPS = 1e-9

_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": TiB,
    "tib": TiB,
    "pi": PiB,
    "pib": PiB,
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float, *, field: str = "value") -> int:
    """Parse a byte quantity: `4GiB`, `512Mi`, `1.5G`, `1000` or a number.

    Decimal suffixes (k, M, G, T, P, with or without a trailing B) are powers of 1000, binary
    ones (Ki, Mi, Gi, Ti, Pi, with or without B) powers of 1024. Fractions round up to a whole
    byte.

    Raises:
        InvalidSpecError: naming `field` and the bad value.
    """
    if isinstance(value, bool):
        raise InvalidSpecError(f"{field} must be a byte quantity such as 4GiB, got {value!r}")
    if isinstance(value, int | float):
        number, scale = float(value), 1
    else:
        match = _QUANTITY.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _BYTE_UNITS:
            raise InvalidSpecError(
                f"{field} must be a byte quantity such as 4GiB, 512Mi or 1.5G, got {value!r}"
            )
        number, scale = float(match.group(1)), _BYTE_UNITS[unit]
    if not math.isfinite(number) or number < 0:
        raise InvalidSpecError(f"{field} must be a finite quantity >= 0, got {value!r}")
    return math.ceil(number * scale)


def parse_cpu(value: str | int | float, *, field: str = "cpu") -> float:
    """Parse a cpu quantity: `2`, `0.5`, `"1.5"` or millicores such as `"500m"`.

    Raises:
        InvalidSpecError: naming `field` and the bad value.
    """
    if isinstance(value, bool):
        raise InvalidSpecError(
            f"{field} must be a number of cores such as 2 or 500m, got {value!r}"
        )
    if isinstance(value, int | float):
        cores = float(value)
    else:
        match = _QUANTITY.match(value)
        unit = match.group(2) if match else ""
        if match is None or unit not in ("", "m"):
            raise InvalidSpecError(
                f"{field} must be a number of cores such as 2, 0.5 or 500m, got {value!r}"
            )
        cores = float(match.group(1)) / (1000 if unit == "m" else 1)
    if not math.isfinite(cores) or cores < 0:
        raise InvalidSpecError(f"{field} must be a finite number of cores >= 0, got {value!r}")
    return cores


def format_bytes(n: float) -> str:
    """Format bytes for people, in binary units: `1536` -> `1.5KiB`."""
    for unit, size in (("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:.0f}B"


def _check_amount(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# `gc=False`: a frozen value of numbers that cannot be part of a reference cycle (see task.py).
class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An immutable, non-negative resource vector.

    Arithmetic is by dimension; `extra` dimensions missing from one side count as zero.
    """

    cpu: float = 0.0
    mem: int = 0
    disk: int = 0
    gpu: int = 0
    extra: dict[str, float] = {}

    def __post_init__(self) -> None:
        cpu, mem, disk, gpu = self.cpu, self.mem, self.disk, self.gpu
        # The common case (plain non-negative numbers, no extras) is checked in one expression:
        # the scheduler builds vectors on every placement and completion.
        if (
            not self.extra
            and (type(cpu) is float or type(cpu) is int)
            and 0 <= cpu < math.inf
            and type(mem) is int
            and type(disk) is int
            and type(gpu) is int
            and mem >= 0
            and disk >= 0
            and gpu >= 0
        ):
            return
        _check_amount("cpu", self.cpu)
        for name in ("mem", "disk", "gpu"):
            value = getattr(self, name)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"{name} must be a whole number, got {value!r}")
                msgspec.structs.force_setattr(self, name, int(value))
            _check_amount(name, value)
        for key, value in self.extra.items():
            if not key:
                raise ValueError("extra resource names must not be empty")
            _check_amount(f"extra.{key}", value)

    @classmethod
    def parse(
        cls,
        *,
        cpu: str | float = 0,
        mem: str | int | float = 0,
        disk: str | int | float = 0,
        gpu: str | int = 0,
        extra: Mapping[str, str | float] | None = None,
    ) -> Resources:
        """Build from people's units: `Resources.parse(cpu="500m", mem="4GiB")`.

        Raises:
            InvalidSpecError: naming the field and the bad value.
        """
        gpus = parse_cpu(gpu, field="gpu")
        if not gpus.is_integer():
            raise InvalidSpecError(f"gpu must be a whole number of devices, got {gpu!r}")
        return cls(
            cpu=parse_cpu(cpu),
            mem=parse_bytes(mem, field="mem"),
            disk=parse_bytes(disk, field="disk"),
            gpu=int(gpus),
            extra={k: parse_cpu(v, field=f"extra.{k}") for k, v in (extra or {}).items()},
        )

    # -- views ---------------------------------------------------------------------------

    def items(self) -> Iterator[tuple[str, float]]:
        """Every dimension as `(name, amount)`; extras are named `extra.<name>`."""
        yield "cpu", self.cpu
        yield "mem", self.mem
        yield "disk", self.disk
        yield "gpu", self.gpu
        for key, value in self.extra.items():
            yield f"extra.{key}", value

    def is_zero(self) -> bool:
        """True when every dimension is zero."""
        return all(v <= _EPS for _, v in self.items())

    def describe(self) -> str:
        """A short human form: `cpu=2 mem=4GiB disk=0B gpu=0`, zeros after the first two left out."""
        parts = [f"cpu={self.cpu:g}", f"mem={format_bytes(self.mem)}"]
        if self.disk:
            parts.append(f"disk={format_bytes(self.disk)}")
        if self.gpu:
            parts.append(f"gpu={self.gpu}")
        parts.extend(f"{k}={v:g}" for k, v in self.extra.items())
        return " ".join(parts)

    def amount(self, name: str) -> float:
        """The amount of one dimension by its `items()` name."""
        if name.startswith("extra."):
            return self.extra.get(name[6:], 0.0)
        return float(getattr(self, name))

    # -- arithmetic ----------------------------------------------------------------------

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            cpu=self.cpu + other.cpu,
            mem=self.mem + other.mem,
            disk=self.disk + other.disk,
            gpu=self.gpu + other.gpu,
            extra=_merge(self.extra, other.extra, lambda a, b: a + b),
        )

    def __sub__(self, other: Resources) -> Resources:
        """Subtract, clamping at zero: free room never goes negative."""
        return Resources(
            cpu=max(0.0, self.cpu - other.cpu),
            mem=max(0, self.mem - other.mem),
            disk=max(0, self.disk - other.disk),
            gpu=max(0, self.gpu - other.gpu),
            extra=_merge(self.extra, other.extra, lambda a, b: max(0.0, a - b)),
        )

    def __mul__(self, k: float) -> Resources:
        if not math.isfinite(k) or k < 0:
            raise ValueError(f"a resource vector can only be scaled by a finite k >= 0, got {k}")
        return Resources(
            cpu=self.cpu * k,
            mem=math.ceil(self.mem * k),
            disk=math.ceil(self.disk * k),
            gpu=math.ceil(self.gpu * k),
            extra={n: v * k for n, v in self.extra.items()},
        )

    __rmul__ = __mul__

    def fits_in(self, capacity: Resources) -> bool:
        """True when every dimension of self is at most that of `capacity`."""
        if (
            self.cpu > capacity.cpu + _EPS
            or self.mem > capacity.mem
            or self.disk > capacity.disk
            or self.gpu > capacity.gpu
        ):
            return False
        return all(v <= capacity.extra.get(k, 0.0) + _EPS for k, v in self.extra.items() if v)

    def max(self, other: Resources) -> Resources:
        """The per-dimension maximum."""
        return Resources(
            cpu=max(self.cpu, other.cpu),
            mem=max(self.mem, other.mem),
            disk=max(self.disk, other.disk),
            gpu=max(self.gpu, other.gpu),
            extra=_merge(self.extra, other.extra, max),
        )

    def min(self, other: Resources) -> Resources:
        """The per-dimension minimum."""
        return Resources(
            cpu=min(self.cpu, other.cpu),
            mem=min(self.mem, other.mem),
            disk=min(self.disk, other.disk),
            gpu=min(self.gpu, other.gpu),
            extra={k: min(v, other.extra.get(k, 0.0)) for k, v in self.extra.items()},
        )

    def shares(self, capacity: Resources) -> dict[str, float]:
        """Per-dimension share of `capacity` used by self (0 for a dimension both lack).

        A dimension that self needs but `capacity` lacks has share `inf`.
        """
        out: dict[str, float] = {}
        for name, need in self.items():
            have = capacity.amount(name)
            if have > 0:
                out[name] = need / have
            else:
                out[name] = math.inf if need > _EPS else 0.0
        for name, _ in capacity.items():
            out.setdefault(name, 0.0)
        return out

    def dominant_share(self, capacity: Resources) -> float:
        """The largest per-dimension share of `capacity` that self uses."""
        return max(self.shares(capacity).values(), default=0.0)

    def exceeding(self, capacity: Resources) -> list[str]:
        """Names of the dimensions in which self exceeds `capacity`."""
        return [
            name
            for name, need in self.items()
            if need > capacity.amount(name) + (_EPS if name == "cpu" or "." in name else 0)
        ]


def _merge(a: dict[str, float], b: dict[str, float], op: Any) -> dict[str, float]:
    if not a and not b:
        return {}
    keys = a.keys() | b.keys()
    merged = {k: op(a.get(k, 0.0), b.get(k, 0.0)) for k in keys}
    return {k: v for k, v in merged.items() if v}


class Requirements(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """An alloc request: at least `min`, and up to `width` more copies of it would be useful.

    A pending request counts at its full size, `min * (1 + width)`, so that the scheduler never
    asks again for room it has already asked for.
    """

    min: Resources
    width: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.width, bool) or self.width < 0:
            raise ValueError(f"width must be a whole number >= 0, got {self.width!r}")

    @property
    def full(self) -> Resources:
        """The most this request could usefully receive."""
        return self.min * (1 + self.width)


class AllocShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One kind of alloc a cluster offers: its capacity and, where known, its price per second.

    The planner packs into the shapes on offer and picks the cheapest mix; with no price, the
    price is taken as proportional to the shape's size.
    """

    resources: Resources
    price: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.price is not None and (not math.isfinite(self.price) or self.price < 0):
            raise ValueError(f"price must be a finite number >= 0, got {self.price!r}")
