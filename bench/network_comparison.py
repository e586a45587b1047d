"""The four adapter types (LoRA, DoRA, LoHa, LoKr) on the demo world at equal trainable parameters.

`python -m bench.network_comparison [--output-dir DIR] [--write-spec] [--plan-only] [--networks TYPE ...]
[--dora-axis input|output]`

LoRA rank 4 (sweeps/demo-lr.toml's settings: 200 steps, checkpoints 100 and 200, batch 4, 64 px) sets the
parameter budget. For DoRA, LoHa and LoKr the rank (and LoKr's `lokr_factor`) whose trainable parameter
count (tasks.lora.size.adapter_params: peft's layer shapes on the meta device) is closest to it is chosen
(ties: the smaller rank); LoKr's factor 1 is left out, as its Kronecker product with a 1 x 1 factor is a
LoRA with one extra scale per layer. Alpha = rank for every type (scale 1). Each type is one
`[[training.variants]]` entry, crossed with two learning rates. The sweep (its TOML is what `--write-spec`
saves as sweeps/demo-networks.toml) runs through the real `lora-sweep` flow under a temporary Prefect
server, then the catalog gives the mean concept score at LoRA weight 1 per type, learning rate and
checkpoint step, with the runs' recorded trainable parameters. `--networks` trains only the named types (the
budget is still LoRA rank 4's); `--dora-axis` picks DoRA's magnitude axis (training.dora_axis, default "input").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "TQDM_DISABLE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)  # before torch, diffusers or prefect read them

import duckdb

from tasks.lora.size import adapter_params
from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, planned_runs

REPO = Path(__file__).resolve().parent.parent
SHIPPED_SPEC = REPO / "sweeps" / "demo-networks.toml"
REFERENCE = ("lora", 4)  # the type and rank whose trainable parameters every other type is matched to
CANDIDATE_RANKS = range(1, 65)
LOKR_FACTORS = (-1, 2, 4, 8, 16, 32)  # 1 left out: kron(1 x 1, W) is a LoRA with one extra scale
LEARNING_RATES = (2e-3, 4e-3)
NETWORKS = ("lora", "dora", "loha", "lokr")

SPEC_HEAD = """\
# The four adapter types on the demo world at (as near as each type allows) equal trainable parameters:
# LoRA rank 4 sets the budget; each other type gets the rank (and LoKr factor) whose parameter count is
# closest to it. Written by `python -m bench.network_comparison --write-spec`, which also runs it and prints
# the concept score per type (README "Adapter types"). Alpha = rank everywhere (scale 1). 8 runs.
name = "demo-networks"
output_dir = "{output_dir}"

[dataset]
path = "builtin:demo-world"     # generated in code: 12 captioned images of the zqx concept
trigger_word = "zqx"

[[base_models]]
name = "tiny-sd15-world"
path = "builtin:tiny-sd15-world"

[training]
ranks = [4]                     # each variant sets its own
learning_rate = [{learning_rates}]   # an axis: every type at both
max_steps = 200
checkpoint_steps = [100, 200]
batch_size = 4
resolution = 64
seed = 0
"""
SPEC_RENDER = """
[render]
prompts = ["{trigger}, a magenta triangle with a yellow outline on a teal background",
           "a {trigger} on a teal background"]
negative_prompt = "blurry"
seeds = [1, 2, 3]
samplers = ["Euler a"]
steps = [20]
lora_weights = [0.0, 1.0]
width = 64
height = 64
"""

# Mean concept score at weight 1 per run and checkpoint step, with what the runs table recorded.
SCORES_SQL = """
SELECT r.variant, r.network, r.rank, r.network_args, r.trainable_params, r.learning_rate, i.checkpoint_step AS step,
       avg(m.value) AS concept, stddev_samp(m.value) AS spread, count(*) AS images
FROM images AS i JOIN runs AS r USING (run_id) JOIN image_metrics AS m USING (image_id)
WHERE m.metric = 'concept_score' AND i.lora_weight = 1.0
GROUP BY ALL ORDER BY r.learning_rate, r.variant, step
"""
BASELINE_SQL = """
SELECT avg(m.value), count(*) FROM images AS i JOIN image_metrics AS m USING (image_id)
WHERE m.metric = 'concept_score' AND i.lora_weight = 0.0
"""


@dataclass(frozen=True)
class Choice:
    """One adapter type at the rank (and LoKr factor) closest to the reference's parameter count."""

    network: str
    rank: int
    lokr_factor: int
    params: int
    dora_axis: str | None = None  # DoRA's magnitude axis (training.dora_axis); None for other types

    @property
    def name(self) -> str:
        factor = f"-f{self.lokr_factor}" if self.network == "lokr" else ""
        axis = f"-{self.dora_axis}" if self.network == "dora" else ""
        return f"{self.network}{axis}-r{self.rank}{factor}"

    def toml(self) -> str:
        factor = f"\nlokr_factor = {self.lokr_factor}" if self.network == "lokr" else ""
        axis = f'\ndora_axis = "{self.dora_axis}"' if self.network == "dora" else ""
        return (f"\n[[training.variants]]   # {self.params} trainable parameters\n"
                f'name = "{self.name}"\nnetwork = "{self.network}"\nranks = [{self.rank}]{factor}{axis}\n')


def spec_text(choices: list[Choice], output_dir: str) -> str:
    """The comparison sweep's TOML."""
    rates = ", ".join(f"{lr:g}" for lr in LEARNING_RATES)
    return (SPEC_HEAD.format(output_dir=output_dir, learning_rates=rates) + "".join(c.toml() for c in choices)
            + SPEC_RENDER)


def reference_run(output_dir: Path) -> TrainingRunSpec:
    """The reference LoRA's planned run (prepares the builtin base model under `output_dir`)."""
    data = tomllib.loads(spec_text([Choice(REFERENCE[0], REFERENCE[1], -1, 0)], str(output_dir)))
    spec = parse_spec(data)
    with contextlib.redirect_stdout(sys.stderr):  # the dataset summary
        inputs = prepare_inputs(spec)
    return planned_runs(spec, inputs)[0]


def closest(run: TrainingRunSpec, network: str, target: int, dora_axis: str = "input") -> Choice:
    """The rank (and LoKr factor) of `network` whose parameter count is closest to `target`."""
    model_dir = Path(run.base_model.config or run.base_model_path)
    axis = dora_axis if network == "dora" else None
    candidates = []
    for factor in LOKR_FACTORS if network == "lokr" else (-1,):
        for rank in CANDIDATE_RANKS:
            params = adapter_params(model_dir, run.model_copy(update={"network": network, "rank": rank,
                                                                      "lokr_factor": factor, "dora_axis": axis}))
            candidates.append((abs(params - target), rank, factor, params))
    _, rank, factor, params = min(candidates)
    return Choice(network, rank, factor, params, axis)


def choose(output_dir: Path, networks: tuple[str, ...] = NETWORKS,
           dora_axis: str = "input") -> tuple[int, list[Choice]]:
    """The reference's parameter count, and each adapter type of `networks` at it."""
    run = reference_run(output_dir)
    model_dir = Path(run.base_model.config or run.base_model_path)
    target = adapter_params(model_dir, run.model_copy(update={"network": REFERENCE[0], "rank": REFERENCE[1]}))
    reference = [Choice(REFERENCE[0], REFERENCE[1], -1, target)] if REFERENCE[0] in networks else []
    return target, reference + [closest(run, network, target, dora_axis) for network in networks
                                if network != REFERENCE[0]]


def run_sweep(spec_path: Path, prefect_home: Path) -> tuple[list[dict[str, object]], tuple[float, int]]:
    """Run the sweep through the lora-sweep flow under a temporary Prefect server; the score rows and the
    no-LoRA baseline's (mean concept score, images)."""
    os.environ["PREFECT_HOME"] = str(prefect_home)
    # Imported here, not at the top: Prefect reads PREFECT_HOME when it is first imported.
    from prefect.testing.utilities import prefect_test_harness

    from flows.lora_sweep import lora_sweep

    with prefect_test_harness(server_startup_timeout=300):
        summary = lora_sweep(spec_path=str(spec_path))  # a failed sweep raises here, naming what failed
    with duckdb.connect(str(Path(summary["sweep_root"]) / "catalog.duckdb"), read_only=True) as con:
        cursor = con.execute(SCORES_SQL)
        names = [c[0] for c in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        baseline = con.execute(BASELINE_SQL).fetchone()
    return rows, (float(baseline[0]), int(baseline[1]))


def format_rows(rows: list[dict[str, object]], baseline: tuple[float, int]) -> str:
    """One Markdown row per type and learning rate: rank, recorded parameters, concept score per step (mean ±
    the standard deviation over the images)."""
    steps = sorted({r["step"] for r in rows})
    table: dict[tuple, dict[int, tuple[float, float, int]]] = {}
    for r in rows:
        key = (r["learning_rate"], r["variant"], r["network"], r["rank"], r["network_args"], r["trainable_params"])
        table.setdefault(key, {})[r["step"]] = (r["concept"], r["spread"], r["images"])
    lines = ["| type | rank | kohya network_args | trainable params | learning rate | "
             + " | ".join(f"concept score, step {s}" for s in steps) + " |",
             "|---|---|---|---|---|" + "---|" * len(steps)]
    for (lr, _, network, rank, args, params), scores in table.items():
        cells = " | ".join(f"{scores[s][0]:.3f} ± {scores[s][1]:.3f} (n={scores[s][2]})" if s in scores else "-"
                           for s in steps)
        lines.append(f"| {network} | {rank} | `{args}` | {params} | {lr:g} | {cells} |")
    lines.append(f"\nbase model without a LoRA (weight 0): {baseline[0]:.3f} (n={baseline[1]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network_comparison", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, help="where the sweep goes (default: a temporary folder)")
    parser.add_argument("--write-spec", action="store_true", help=f"save the sweep as {SHIPPED_SPEC.relative_to(REPO)}")
    parser.add_argument("--plan-only", action="store_true", help="print the chosen ranks and counts; train nothing")
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS),
                        help="train only these types (the parameter budget stays LoRA rank 4's)")
    parser.add_argument("--dora-axis", choices=("input", "output"), default="input", help="DoRA's magnitude axis")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.output_dir or Path(scratch)).resolve()
        budget, choices = choose(out / "outputs", tuple(n for n in NETWORKS if n in args.networks), args.dora_axis)
        for c in choices:
            print(f"{c.name:<18} network={c.network:<5} rank={c.rank:<3} lokr_factor={c.lokr_factor:<3} "
                  f"trainable params={c.params} ({c.params / budget - 1:+.1%} vs lora-r{REFERENCE[1]})")
        if args.write_spec:
            SHIPPED_SPEC.write_text(spec_text(choices, "../outputs"))
        if args.plan_only:
            return 0
        spec_path = out / "demo-networks.toml"
        spec_path.write_text(spec_text(choices, str(out / "outputs")))
        rows, baseline = run_sweep(spec_path, out / "prefect-home")
    print(format_rows(rows, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
