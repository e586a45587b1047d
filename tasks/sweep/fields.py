"""Building blocks of the spec's sections: a frozen model that refuses unknown keys, and shared checks."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class Frozen(BaseModel):
    """A spec section: immutable, and an unknown key is an error (a misspelt option is never ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def unique_values(values: tuple, field: str) -> tuple:
    """`values` unchanged, or a ValueError naming every repeated value."""
    dupes = sorted({repr(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{field} must not repeat values; repeated: {', '.join(dupes)}")
    return values


def check_builtin(value: str, allowed: tuple[str, ...]) -> None:
    """A `builtin:NAME` path must name one of `allowed`; other paths pass."""
    if value.startswith("builtin:") and value[len("builtin:") :] not in allowed:
        names = ", ".join("builtin:" + a for a in allowed)
        raise ValueError(f"unknown builtin {value!r}; allowed builtins: {names}")
