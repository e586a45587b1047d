"""Sweep spec: shipped specs validate; every bad input is reported with field, value and what is allowed."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest

from tasks.sweep.load import SpecError, load_spec, parse_spec

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"


def demo_data() -> dict:
    return tomllib.loads((SWEEPS / "demo.toml").read_text())


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name
    assert Path(spec.output_dir).is_absolute()


def test_demo_spec_has_the_axes_the_demo_needs() -> None:
    spec = load_spec(SWEEPS / "demo.toml")
    assert len(spec.training.ranks) >= 2 and len(spec.training.checkpoint_steps) >= 2
    assert len(spec.render.seeds) >= 2 and len(spec.render.samplers) >= 2 and len(spec.render.steps) >= 2
    assert 0.0 in spec.render.lora_weights
    assert all(spec.dataset.trigger_word in p for p in spec.prompt_texts())


def test_spec_is_frozen() -> None:
    spec = parse_spec(demo_data())
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]


def test_sweep_id_is_stable_and_changes_with_content() -> None:
    a, b = parse_spec(demo_data()), parse_spec(demo_data())
    assert a.sweep_id() == b.sweep_id()
    data = demo_data()
    data["render"]["seeds"] = [1, 2, 3]
    assert parse_spec(data).sweep_id() != a.sweep_id()


def errors_for(mutate) -> str:
    data = copy.deepcopy(demo_data())
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["training"].update(rnaks=[4]), ["training.rnaks", "unknown key"]),
        (lambda d: d.update(outptu_dir="x"), ["outptu_dir", "unknown key"]),
        (lambda d: d["training"].update(ranks=[0, 4]), ["training.ranks.0", "got 0", "greater than or equal to 1"]),
        (lambda d: d["training"].update(ranks=[]), ["training.ranks", "at least 1"]),
        (lambda d: d["training"].update(checkpoint_steps=[100, 900]), ["training", "[900]", "max_steps 200"]),
        (lambda d: d["render"].update(samplers=["Euler a", "Eulr"]), ["render.samplers", "Eulr", "Euler a"]),
        (lambda d: d["render"].update(seeds=[]), ["render.seeds", "at least 1"]),
        (lambda d: d["render"].update(seeds=[1, 1]), ["render.seeds", "repeat"]),
        (lambda d: d["render"].update(width=100), ["render.width", "100", "multiple of 8"]),
        (lambda d: d["render"].update(lora_weights=["heavy"]), ["render.lora_weights.0", "heavy"]),
        (lambda d: d["training"].update(learning_rate=-1), ["training.learning_rate", "-1", "greater than 0"]),
        (lambda d: d.pop("dataset"), ["dataset", "missing"]),
        (lambda d: d["dataset"].update(path="builtin:nope"), ["dataset.path", "builtin:nope", "builtin:demo-world"]),
        (lambda d: d["base_models"][0].update(path="builtin:sdxl"), ["base_models.0.path", "builtin:tiny-sd15"]),
        (lambda d: d["base_models"].append(dict(d["base_models"][0])), ["base model names", "tiny-sd15"]),
        (lambda d: d["render"].update(prompts=["a cat"]), ["render.prompts", "a cat", "trigger word"]),
        (lambda d: d["render"].update(steps=[0]), ["render.steps.0", "got 0"]),
        (lambda d: d["dataset"].update(trigger_word="two words"), ["dataset.trigger_word", "two words"]),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(mutate, expected: list[str]) -> None:
    message = errors_for(mutate)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_all_problems_are_reported_at_once() -> None:
    def many(d: dict) -> None:
        d["training"]["ranks"] = [0]
        d["render"]["samplers"] = ["Nope"]
        d["render"]["typo"] = 1

    message = errors_for(many)
    assert "3 problem(s)" in message
    for fragment in ("training.ranks.0", "render.samplers", "render.typo"):
        assert fragment in message


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    data = (SWEEPS / "demo.toml").read_text().replace('"builtin:demo-world"', '"data/mine"')
    (tmp_path / "s.toml").write_text(data)
    spec = load_spec(tmp_path / "s.toml")
    assert spec.dataset.path == str((tmp_path / "data/mine").resolve())
    assert spec.base_models[0].path == "builtin:tiny-sd15-world"


A1111_PAIRS = '''samplers = [
  "Euler a",
  { sampler = "DPM++ 2M", schedule_type = "Karras" },
  { sampler = "DPM++ SDE", schedule_type = "uniform" },
  { sampler = "DDIM" },
]
'''


def test_a1111_sampler_and_schedule_type_pairs_normalise_to_registry_names(tmp_path: Path) -> None:
    text = (SWEEPS / "demo.toml").read_text()
    demo_line = re.search(r"^samplers = \[.*\]\n", text, re.MULTILINE)
    assert demo_line is not None
    (tmp_path / "s.toml").write_text(text.replace(demo_line.group(0), A1111_PAIRS))
    spec = load_spec(tmp_path / "s.toml")
    assert spec.render.samplers == ("Euler a", "DPM++ 2M Karras", "DPM++ SDE", "DDIM")
    data = demo_data()
    data["render"]["samplers"] = list(spec.render.samplers)
    assert parse_spec(data).sweep_id() == parse_spec(tomllib.loads((tmp_path / "s.toml").read_text())).sweep_id()


def test_bad_a1111_pairs_are_reported_at_once_with_field_value_and_allowed() -> None:
    def bad(d: dict) -> None:
        d["render"]["samplers"] = [
            "Euler a",
            {"sampler": "DPM++ 2N", "schedule_type": "Karass"},  # both unknown: both reported
            {"sampler": "Euler", "schedule_type": "Exponential"},  # a pair the registry lacks
            {"schedule_type": "Karras"},  # no sampler
            {"sampler": "Euler", "scheduler": "Karras"},  # misspelt key
        ]

    message = errors_for(bad)
    assert "4 problem(s)" in message
    for fragment in (
        "render.samplers.1: { sampler = 'DPM++ 2N', schedule_type = 'Karass' }: unknown A1111 sampler 'DPM++ 2N'. "
        "Did you mean 'DPM++ 2M'? Valid: 'Euler', 'Euler a',",
        "; unknown A1111 schedule type 'Karass'. Did you mean 'Karras'? Valid: 'Automatic', 'Uniform', 'Karras',",
        "render.samplers.2: { sampler = 'Euler', schedule_type = 'Exponential' }: sampler 'Euler' with schedule type "
        "'Exponential' is not in the registry; schedule types supported for 'Euler': 'Automatic'",
        "render.samplers.3: { schedule_type = 'Karras' }: sampler is required",
        "render.samplers.4: { sampler = 'Euler', scheduler = 'Karras' }: unknown key 'scheduler'; allowed: "
        "{ sampler = '<A1111 sampler>', schedule_type = '<A1111 schedule type>' } (schedule_type optional)",
    ):
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_a1111_pair_repeating_a_registry_name_is_an_error() -> None:
    message = errors_for(lambda d: d["render"].update(samplers=["DPM++ 2M Karras", {"sampler": "DPM++ 2M"}]))
    assert "render.samplers: got ['DPM++ 2M Karras', {'sampler': 'DPM++ 2M'}]; samplers must not repeat a sampler; " \
           "repeated: 'DPM++ 2M Karras'" in message
