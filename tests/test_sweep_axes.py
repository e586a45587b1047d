"""Training axes, named variants and dataset variants: what the plan trains, the ids, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import training_runs
from tests.conftest import small_sweep_data

# Planning needs a base model's family only; a missing folder reads as SD1.5 (no SDXL text_encoder_2).
PATHS = ({"tiny-sd15": "/nonexistent/tiny-sd15"}, "/nonexistent/data", "fingerprint")


def plan(tmp_path: Path, prepared: dict | None = None, **changes: object):
    data = small_sweep_data(tmp_path)
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    spec = parse_spec(data)
    return spec, training_runs(spec, *PATHS, prepared)


def problems(tmp_path: Path, **changes: object) -> list[str]:
    with pytest.raises(SpecError) as err:
        plan(tmp_path, **changes)
    return err.value.problems


def test_list_valued_options_train_their_product_with_base_models_and_ranks(tmp_path: Path) -> None:
    spec, runs = plan(tmp_path, training__learning_rate=[1e-4, 1e-3, 1e-2], training__alpha=[1, 8])
    assert len(runs) == 3 * 2 * 2  # learning rates x alphas x ranks [2, 4]
    combos = {(r.learning_rate, r.alpha, r.rank) for r in runs}
    assert combos == {(lr, float(a), k) for lr in (1e-4, 1e-3, 1e-2) for a in (1, 8) for k in (2, 4)}
    assert len({r.run_id for r in runs}) == len(runs)
    assert spec.training_axes == {"learning_rate": (1e-4, 1e-3, 1e-2), "alpha": (1, 8)}


def test_a_run_at_todays_values_keeps_its_id_whether_or_not_an_axis_lists_it(tmp_path: Path) -> None:
    _, plain = plan(tmp_path)
    _, swept = plan(tmp_path, training__learning_rate=[1e-3, 3e-3])
    _, one = plan(tmp_path, training__learning_rate=[1e-3])
    assert [r.run_id for r in swept if r.learning_rate == 1e-3] == [r.run_id for r in plain]
    assert [r.run_id for r in one] == [r.run_id for r in plain]
    plain_spec, _ = plan(tmp_path)
    assert plain_spec.sweep_id() == parse_spec(small_sweep_data(tmp_path)).sweep_id()


def test_list_options_are_axes_when_given_a_list_of_lists(tmp_path: Path) -> None:
    _, runs = plan(tmp_path, training__target_modules=[["to_q", "to_v"], ["to_q", "to_k", "to_v", "to_out.0"]])
    assert {r.target_modules for r in runs} == {("to_q", "to_v"), ("to_q", "to_k", "to_v", "to_out.0")}
    _, runs = plan(tmp_path, training__target_modules=["to_q", "to_v"])  # a plain list is one value
    assert {r.target_modules for r in runs} == {("to_q", "to_v")}


def test_named_variants_are_labelled_and_combine_with_axes(tmp_path: Path) -> None:
    variants = [{"name": "plain"}, {"name": "cosine", "lr_scheduler": "cosine", "lr_warmup_steps": 2}]
    _, runs = plan(tmp_path, training__variants=variants, training__seed=[0, 1])
    assert len(runs) == 2 * 2 * 2
    cosine = [r for r in runs if r.variant == "cosine"]
    assert {(r.lr_scheduler, r.lr_warmup_steps) for r in cosine} == {("cosine", 2)}
    assert {r.lr_scheduler for r in runs if r.variant == "plain"} == {"constant"}
    _, base = plan(tmp_path)
    assert {r.run_id for r in runs if r.variant == "plain" and r.seed == 0} == {r.run_id for r in base}


def test_dataset_variants_are_an_axis_with_their_own_caption_options(tmp_path: Path) -> None:
    datasets = [{"name": "as-is"}, {"name": "dropout", "caption_dropout": 0.5}]
    prepared = {"as-is": ("/nonexistent/data", "fingerprint"), "dropout": ("/nonexistent/data", "fingerprint")}
    _, runs = plan(tmp_path, prepared, datasets=datasets)
    assert len(runs) == 2 * 2
    assert {(r.dataset_name, r.dataset.caption_dropout) for r in runs} == {("as-is", 0.0), ("dropout", 0.5)}
    _, base = plan(tmp_path)
    assert {r.run_id for r in runs if r.dataset_name == "as-is"} == {r.run_id for r in base}
    assert not {r.run_id for r in runs if r.dataset_name == "dropout"} & {r.run_id for r in base}


def test_an_unknown_option_in_a_variant_is_named_with_what_is_allowed(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, training__variants=[{"name": "fast", "learnig_rate": 1e-2}])
    assert "training.variants[0] ('fast')" in problem and "'learnig_rate'" in problem
    assert "learning_rate" in problem.split("allowed:")[1]


def test_an_axis_value_of_the_wrong_type_is_named_with_its_index(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, training__learning_rate=[1e-3, "fast"])
    assert problem.startswith("training.learning_rate[1] = 'fast'") and "valid number" in problem
    [problem] = problems(tmp_path, training__lora_dropout=[0.0, 1.5])
    assert problem.startswith("training.lora_dropout[1] = 1.5") and "less than 1" in problem


def test_a_product_over_max_runs_is_refused_with_its_counts(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, training__learning_rate=[1e-4, 1e-3, 1e-2], training__alpha=[1, 2, 4, 8],
                         max_runs=20)
    assert "1 base model x 4 alpha x 3 learning_rate x 2 ranks = 24 runs" in problem  # the spec's key order and "max_runs = 20" in problem
    _, runs = plan(tmp_path, training__learning_rate=[1e-4, 1e-3, 1e-2], training__alpha=[1, 2, 4, 8], max_runs=24)
    assert len(runs) == 24


def test_a_huge_product_is_refused_without_being_enumerated(tmp_path: Path) -> None:
    axes = {f"training__{k}": [float(v) for v in range(1, 11)] for k in ("alpha", "noise_offset")}
    axes["training__noise_offset"] = [v / 10 for v in range(11)]
    axes["training__seed"] = list(range(10_000))
    [problem] = problems(tmp_path, **axes)
    assert "over max_runs = 100" in problem


def test_variant_names_must_be_unique_and_not_repeat_an_axis(tmp_path: Path) -> None:
    found = problems(tmp_path, training__learning_rate=[1e-3, 2e-3],
                     training__variants=[{"name": "a"}, {"name": "a", "learning_rate": 1e-2}])
    assert any("training.variants names must be unique; repeated: 'a'" in p for p in found)
    assert any("learning_rate is also a training axis" in p for p in found)


def test_dataset_variants_cannot_change_the_trigger_and_check_their_options(tmp_path: Path) -> None:
    found = problems(tmp_path, datasets=[{"name": "x", "trigger_word": "other"}, {"name": "y", "caption_dropout": 2}])
    assert any("datasets[0] ('x'): trigger_word cannot differ" in p for p in found)
    assert any(p.startswith("datasets[1] ('y')") and "caption_dropout" in p for p in found)


def test_options_that_disagree_in_one_combination_name_it(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, training__max_steps=[12, 4], training__checkpoint_steps=[4],
                         training__lr_scheduler="cosine", training__lr_warmup_steps=6)
    assert problem == "training.max_steps[1] = 4: lr_warmup_steps 6 exceeds max_steps 4; allowed: 0 to 4"
    [problem] = problems(tmp_path, training__max_steps=[12, 4], training__checkpoint_steps=[4],
                         training__lr_scheduler="cosine", training__lr_warmup_steps=[2, 6])
    assert problem.startswith("training (max_steps = 4, lr_warmup_steps = 6)")
    assert "lr_warmup_steps 6 exceeds max_steps 4" in problem


def test_an_empty_axis_and_a_list_for_a_fixed_option_are_refused(tmp_path: Path) -> None:
    [problem] = problems(tmp_path, training__learning_rate=[])
    assert problem.startswith("training.learning_rate = []")
    [problem] = problems(tmp_path, training__cache=["disk", "memory"])
    assert problem.startswith("training.cache")
