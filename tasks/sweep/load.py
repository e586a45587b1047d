"""Read a sweep TOML file into a SweepSpec: every problem reported at once, relative paths resolved."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.sweep.axes import Variant
from tasks.sweep.spec import BUILTIN_PREFIX, SweepSpec


class SpecError(ValueError):
    """Every problem found in a sweep spec, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the sweep spec:\n{lines}")


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (value {err['input']!r}); check the spelling against the documented keys"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, dict):  # a whole-section check: the message names the values
        return f"{loc}: {msg}"
    return f"{loc}: got {value!r}; {msg}"


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> SweepSpec:
    """Validate a parsed TOML dict, raising SpecError with every problem at once."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # pydantic also reports a list as too short once a bad item is dropped; the item's error says it all.
        item_locs = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int)}
        errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"] in item_locs)]
        # A whole-spec check (axes, variants, run count) reports one problem per line, each naming its field.
        problems = [line for e in errors for line in (e["msg"].removeprefix("Value error, ").split("\n")
                                                      if not e["loc"] else [_format_error(e)])]
        raise SpecError(source, problems) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep TOML file; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"spec file {str(path)!r} does not exist; pass the path of a .toml sweep spec"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(str(path), [f"not valid TOML: {err}"]) from None
    spec = parse_spec(data, str(path))
    return resolve_paths(spec, path.parent.resolve())


def resolve_paths(spec: SweepSpec, base: Path) -> SweepSpec:
    """Make dataset, model and output paths absolute (builtins stay symbolic)."""

    def absolute(p: str | None) -> str | None:
        if p is None or p.startswith(BUILTIN_PREFIX):
            return p
        return str((base / Path(p).expanduser()).resolve())

    models = tuple(m.model_copy(update={"path": absolute(m.path), "config": absolute(m.config)}) for m in spec.base_models)
    metrics = spec.metrics.model_copy(update={"clip_model": absolute(spec.metrics.clip_model)})
    return spec.model_copy(
        update={
            "metrics": metrics,
            "output_dir": absolute(spec.output_dir),
            "training": spec.training.model_copy(update={"cache_dir": absolute(spec.training.cache_dir)}),
            "dataset": spec.dataset.model_copy(update={"path": absolute(spec.dataset.path),
                                                       "captioner": _absolute_captioner(spec.dataset.captioner, absolute)}),
            "datasets": tuple(_absolute_variant(v, absolute) for v in spec.datasets),
            "base_models": models,
            "render": spec.render.with_absolute_paths(absolute),
        }
    )


def _absolute_captioner(value: str | None, absolute) -> str | None:
    """`blip:relative/folder` resolves against the spec's folder like every other path."""
    if value is None or ":" not in value:
        return value
    kind, _, path = value.partition(":")
    return f"{kind}:{absolute(path)}"


def _absolute_variant(variant: Variant, absolute) -> Variant:
    """A dataset variant's own path and captioner resolve like the base dataset's."""
    overrides = dict(variant.overrides)
    if isinstance(overrides.get("path"), str):
        overrides["path"] = absolute(overrides["path"])
    if isinstance(overrides.get("captioner"), str):
        overrides["captioner"] = _absolute_captioner(overrides["captioner"], absolute)
    return variant.model_copy(update={"overrides": overrides})
