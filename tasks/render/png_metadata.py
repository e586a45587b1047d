"""AUTOMATIC1111-style `parameters` PNG text chunk, plus our own `lora_sweep` chunk of ids.

The `parameters` text is what A1111 writes and reads ("PNG Info"): the prompt (LoRAs as
`<lora:NAME:WEIGHT>` tags), an optional `Negative prompt:` line, then one line of `Key: value`
settings, values holding commas, colons or quotes written as JSON strings. Like A1111, lines lose
leading and trailing whitespace on the way back.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

PARAMETERS_KEY = "parameters"
LORA_SWEEP_KEY = "lora_sweep"
NEGATIVE_PREFIX = "Negative prompt:"
STANDARD_KEYS = (
    "Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size",
    "Model hash", "Model", "Lora hashes", "Version",
)

# One `Key: value` setting. Keys are a word character then words, spaces, dashes or slashes (as
# A1111 allows); a value is a JSON string, escapes included, or anything up to the next comma.
_SETTING = re.compile(r"""
    \s*(?P<key>\w[\w \-/]+)
    :\s*
    (?P<value>"(?:\\.|[^\\"])*" | [^,]*)
    (?:,|$)
""", re.VERBOSE)
_KEY = re.compile(r"\w[\w \-/]*\w")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_LORA_TAG = re.compile(rf"<lora:(?P<name>[^:<>,\n]+):(?P<weight>{_NUMBER})>")
_TRAILING_LORA_TAGS = re.compile(rf"(?:\s*<lora:[^:<>,\n]+:{_NUMBER}>)+\s*$")
_SIZE = re.compile(r"(\d+)x(\d+)")
_BAD_LORA_NAME = re.compile(r"[:,<>\n\r]")
_MIN_SETTINGS = 3  # A1111: a last line with fewer settings is still prompt text


@dataclass(frozen=True)
class ImageParameters:
    """Everything A1111 needs to reproduce one image. `loras`: (name, weight, short hash or None)."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    schedule_type: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_hash: str | None = None
    model_name: str | None = None
    loras: tuple[tuple[str, float, str | None], ...] = ()
    version: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)


def _number(value: float) -> str:
    """7.0 -> "7", 0.75 -> "0.75": A1111's look, and float(text) gives the value back exactly."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quote(value: str) -> str:
    """Write a value as a JSON string when it would otherwise break or bend the settings line."""
    if value and value == value.strip() and not any(c in value for c in ',:"\n\r'):
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    """Undo `_quote`; a value that only looks quoted but is not valid JSON stays as written."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parameter_problems(params: ImageParameters) -> list[str]:
    """Every reason `params` could not be written so that it reads back the same; empty when fine."""
    problems = []
    # The negative prompt's first line follows the prefix, so only its later lines are at risk.
    at_risk = (("prompt", params.prompt.split("\n")), ("negative_prompt", params.negative_prompt.split("\n")[1:]))
    for what, lines in at_risk:
        if any(line.strip().startswith(NEGATIVE_PREFIX) for line in lines):
            problems.append(f"{what}: a line starts with {NEGATIVE_PREFIX!r}; readers would split the prompt there")
    for what, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
        if _LORA_TAG.search(text):
            problems.append(f"{what}: contains a <lora:...> tag; pass LoRAs in `loras` (diffusers ignores tags)")
    for name, weight, _hash in params.loras:
        if not name or _BAD_LORA_NAME.search(name):
            problems.append(f"loras: name {name!r} is empty or holds one of : , < > or a newline")
        if not math.isfinite(weight):
            problems.append(f"loras: weight {weight!r} of {name!r} is not finite")
    if not math.isfinite(params.cfg_scale):
        problems.append(f"cfg_scale: {params.cfg_scale!r} is not finite")
    for key in params.extra:
        if key in STANDARD_KEYS or not _KEY.fullmatch(key):
            problems.append(
                f"extra: key {key!r} must be 2+ characters of letters, digits, _, space, - or / "
                f"(not at the ends) and not one of {', '.join(STANDARD_KEYS)}"
            )
    return problems


def format_parameters(params: ImageParameters) -> str:
    """The A1111 `parameters` text for one image; ValueError listing every problem if it cannot be."""
    problems = parameter_problems(params)
    if problems:
        raise ValueError("cannot write image parameters:\n" + "\n".join(f"- {p}" for p in problems))
    tags = [f"<lora:{name}:{_number(weight)}>" for name, weight, _hash in params.loras]
    prompt = " ".join(part for part in (params.prompt, *tags) if part)
    negative = f"\n{NEGATIVE_PREFIX} {params.negative_prompt}" if params.negative_prompt else ""
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in _settings(params).items())
    return f"{prompt}{negative}\n{settings}".strip()


def _settings(params: ImageParameters) -> dict[str, str]:
    """The settings line in A1111's order; absent optional values are left out, as A1111 does."""
    hashes = ", ".join(f"{name}: {lora_hash}" for name, _weight, lora_hash in params.loras if lora_hash)
    settings = {
        "Steps": str(params.steps), "Sampler": params.sampler, "Schedule type": params.schedule_type,
        "CFG scale": _number(params.cfg_scale), "Seed": str(params.seed), "Size": f"{params.width}x{params.height}",
        "Model hash": params.model_hash, "Model": params.model_name, "Lora hashes": hashes,
        **params.extra, "Version": params.version,
    }
    return {key: value for key, value in settings.items() if value is not None and (value or key in params.extra)}


def parse_parameters(text: str) -> dict[str, str]:
    """Read A1111 `parameters` text into {"Prompt", "Negative prompt", then each setting}, values unquoted.

    Reads what A1111 writes too. The prompt keeps its `<lora:...>` tags; see `parse_image_parameters`.
    """
    *lines, last = text.strip().split("\n")
    settings = _SETTING.findall(last)
    if len(settings) < _MIN_SETTINGS:
        lines.append(last)
        settings = []
    prompt: list[str] = []
    negative: list[str] = []
    for line in (line.strip() for line in lines):
        if not negative and line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    parsed = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    parsed.update({key: _unquote(value.strip()) for key, value in settings})
    return parsed


def parse_image_parameters(text: str) -> ImageParameters:
    """Typed inverse of `format_parameters`; ValueError naming every missing or malformed setting."""
    parsed = parse_parameters(text)
    required = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
    problems = [f"missing setting {key!r}" for key in required if key not in parsed]
    size = _SIZE.fullmatch(parsed.get("Size", "0x0"))
    if size is None:
        problems.append(f"Size {parsed['Size']!r} is not WIDTHxHEIGHT")
    if problems:
        raise ValueError("cannot read image parameters:\n" + "\n".join(f"- {p}" for p in problems))
    prompt, loras = _split_lora_tags(parsed["Prompt"], _lora_hashes(parsed.get("Lora hashes", "")))
    try:
        steps, cfg, seed = int(parsed["Steps"]), float(parsed["CFG scale"]), int(parsed["Seed"])
    except ValueError as err:
        raise ValueError(f"cannot read image parameters: {err}") from err
    return ImageParameters(
        prompt=prompt, negative_prompt=parsed["Negative prompt"], steps=steps, sampler=parsed["Sampler"],
        schedule_type=parsed.get("Schedule type", "Automatic"), cfg_scale=cfg, seed=seed,
        width=int(size.group(1)), height=int(size.group(2)), model_hash=parsed.get("Model hash"),
        model_name=parsed.get("Model"), loras=loras, version=parsed.get("Version"),
        extra={k: v for k, v in parsed.items() if k not in STANDARD_KEYS},
    )


def _lora_hashes(text: str) -> dict[str, str]:
    """"name: hash, name2: hash2" -> {name: hash}; names never hold commas or colons."""
    pairs = (item.split(":", 1) for item in text.split(",") if ":" in item)
    return {name.strip(): lora_hash.strip() for name, lora_hash in pairs}


def _split_lora_tags(prompt: str, hashes: Mapping[str, str]) -> tuple[str, tuple[tuple[str, float, str | None], ...]]:
    """Take the trailing `<lora:NAME:WEIGHT>` tags off a prompt; tags elsewhere stay prompt text."""
    block = _TRAILING_LORA_TAGS.search(prompt)
    if block is None:
        return prompt, ()
    loras = tuple(
        (m["name"], float(m["weight"]), hashes.get(m["name"])) for m in _LORA_TAG.finditer(block.group(0))
    )
    return prompt[: block.start()], loras


def png_info(params: ImageParameters, ids: Mapping[str, object]) -> PngInfo:
    """PNG text chunks for one image: A1111 `parameters` and our `lora_sweep` JSON of ids."""
    info = PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(params))  # PIL switches to iTXt for non-Latin-1 text
    info.add_text(LORA_SWEEP_KEY, json.dumps(dict(ids), sort_keys=True))
    return info


def read_png_parameters(path: str | Path) -> tuple[str | None, dict[str, object]]:
    """(A1111 `parameters` text or None, our `lora_sweep` ids or {}) of a PNG file."""
    with Image.open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{path}: not a PNG file (format {image.format})")
        chunks = dict(image.text)
    ours = chunks.get(LORA_SWEEP_KEY)
    try:
        ids = json.loads(ours) if ours is not None else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {LORA_SWEEP_KEY!r} chunk is not JSON: {err}") from err
    if not isinstance(ids, dict):
        raise ValueError(f"{path}: the {LORA_SWEEP_KEY!r} chunk is not a JSON object")
    return chunks.get(PARAMETERS_KEY), ids
