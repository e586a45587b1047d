"""`python -m bench [--quick] [--gpu | --gpu-dry-run] [--compile]`: measure, print the table, write results.

CPU suites: train (ours vs notebook loop), render (ours vs notebook vs bare call), grid
(1x/4x/16x cells), flow (the demo sweep through Prefect vs its compute). --gpu adds full-size
UNets on CUDA; --gpu-dry-run runs the same code on CPU with toy UNets so it stays tested.
"""

from __future__ import annotations

import argparse
import os
import sys

for _name, _value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "TQDM_DISABLE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)  # before torch, diffusers or prefect read them

from bench.runner import CPU_SUITES, GPU_SUITES, Options, run_and_report  # noqa: E402

NO_CUDA = ("--gpu needs CUDA, and torch.cuda.is_available() is False here (torch {version}). Run it on a "
           "machine with an NVIDIA GPU and a CUDA build of torch, or use --gpu-dry-run to run the GPU code "
           "paths on CPU with toy UNets (its figures are not GPU figures).")


def parse_args(argv: list[str] | None) -> Options:
    """Command-line options; invalid combinations are errors, all reported at once."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    parser.add_argument("--gpu", action="store_true", help="add full-size SD1.5 and SDXL UNets on CUDA")
    parser.add_argument("--gpu-dry-run", action="store_true", help="the GPU suite on CPU with toy UNets")
    parser.add_argument("--compile", action="store_true", help="GPU suite: add a torch.compile variant")
    parser.add_argument("--peak-tflops", type=float, help="GPU suite: the card's dense bf16 peak, if not known")
    parser.add_argument("--only", help=f"comma-separated suites (default: all of {','.join(CPU_SUITES)}, plus "
                                       f"{','.join(GPU_SUITES)} with --gpu or --gpu-dry-run)")
    parser.add_argument("--threads", type=int, help="torch threads here and in child processes (default: torch's "
                                                     "choice); 1 keeps figures stable on a busy shared machine")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    args = parser.parse_args(argv)
    problems = []
    if args.gpu and args.gpu_dry_run:
        problems.append("--gpu and --gpu-dry-run: choose one")
    if args.compile and not (args.gpu or args.gpu_dry_run):
        problems.append("--compile applies to the GPU suite: add --gpu (or --gpu-dry-run)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        problems.append(f"--peak-tflops {args.peak_tflops}: must be > 0")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: must be >= 1")
    gpu = "gpu" if args.gpu else "dry-run" if args.gpu_dry_run else None
    allowed = CPU_SUITES + (GPU_SUITES if gpu else ())
    suites = allowed if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in suites if s not in allowed]
    if unknown:
        problems.append(f"--only {args.only!r}: unknown suite(s) {unknown}; allowed: {', '.join(allowed)}"
                        + ("" if gpu else f" ({','.join(GPU_SUITES)} with --gpu or --gpu-dry-run)"))
    if problems:
        parser.error("; ".join(problems))
    return Options(quick=args.quick, suites=suites, gpu=gpu, compile=args.compile, peak_tflops=args.peak_tflops,
                   threads=args.threads, out=args.out)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.gpu == "gpu":
        import torch

        if not torch.cuda.is_available():
            print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
            return 2
    run_and_report(options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
