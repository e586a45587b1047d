"""Content ids: every artifact is named by a hash of what produced it, so re-running finds finished work.

The one rule for growing the spec without orphaning old results: an option added after ids were
first issued enters an id only when its value differs from what every earlier id implied (its
default, the behaviour before the option existed). `with_later_options` applies it; plan.py lists,
per id, which options are later ones and what they imply.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel


def content_id(payload: Any, length: int = 16) -> str:
    """A stable id: sha256 of canonical JSON. Same inputs give the same id, so finished work is found."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def with_later_options(identity: dict[str, Any], values: Mapping[str, Any],
                       implied: Mapping[str, Collection[Any]]) -> dict[str, Any]:
    """`identity` plus each later option whose value is not one that ids issued before it existed imply.

    `implied[name]` holds the values that reproduce the old behaviour (usually just the default), so
    a run, render or image made at those values keeps the id it had before the option existed.
    """
    extra = {name: value for name, value in values.items() if value not in implied[name]}
    return {**identity, **extra}


def jsonable(value: object) -> object:
    """Pydantic models, tuples and nested containers as plain JSON values, for hashing."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def checkpoint_id(run_id: str, step: int) -> str:
    return f"{run_id}-s{step}"
