"""``python -m hf_moe_routers.experiments {interference,sensitivity,lm} [--quick] [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = Path("benchmarks/results")
#: Per experiment (its module's name): its spec class, its ``--quick`` spec and its run function.
EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    "interference": ("InterferenceSpec", "quick_spec", "run_interference"),
    "sensitivity": ("SensitivitySpec", "quick_sensitivity_spec", "run_sensitivity"),
    "lm": ("LMSpec", "quick_lm_spec", "run_lm"),
}
#: Options that override the spec field of the same name; each experiment's parser defines only
#: some of them, and an option it lacks (or one not given) leaves the spec's value.
SPEC_OPTIONS = (
    "seeds",
    "routers",
    "episodes_per_class",
    "datasets",
    "depths",
    "dataset",
    "depth",
    "max_steps",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hf_moe_routers.experiments",
        description="Experiments testing the SR-MoE and L2R claims; results go to benchmarks/results/.",
    )
    sub = parser.add_subparsers(dest="experiment", required=True)
    for name, help_text in (
        ("interference", "Experiment A: one-shot interference vs depth × dataset × router."),
        (
            "sensitivity",
            "Experiment A's protocol sweep at depth 8 (validation split); selects the adaptation lr.",
        ),
        ("lm", "Experiment B: routing quality in a small LM (Trainer script) and in the vision model."),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--quick", action="store_true", help="One tiny cell, for CI (writes quick_* files).")
        p.add_argument(
            "--replot",
            action="store_true",
            help="Re-render the Markdown and plots from the existing JSON without running anything.",
        )
        p.add_argument(
            "--output-dir",
            type=Path,
            default=None,
            help=f"Where results go (default {DEFAULT_OUTPUT}; {DEFAULT_OUTPUT}/quick with --quick).",
        )
        p.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the seeds.")
        p.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch threads (1 is fastest for these tiny models; default 1).",
        )
        if name in ("interference", "sensitivity"):
            p.add_argument("--routers", nargs="+", default=None, help="Subset of router presets.")
            p.add_argument("--episodes-per-class", type=int, default=None)
            p.add_argument(
                "--no-residual",
                action="store_true",
                help="Ablation: stack the MoE stages without residual connections (the paper's literal "
                "architecture); pair it with --output-dir so the default results are kept.",
            )
        if name == "interference":
            p.add_argument("--datasets", nargs="+", default=None, choices=("digits", "mnist1d"))
            p.add_argument("--depths", type=int, nargs="+", default=None)
        if name == "sensitivity":
            p.add_argument("--dataset", default=None, choices=("digits", "mnist1d"))
            p.add_argument("--depth", type=int, default=None)
        if name == "lm":
            p.add_argument("--routers", nargs="+", default=None, help="Subset of LM router keys.")
            p.add_argument("--max-steps", type=int, default=None)
    return parser


def _override(spec: object, args: argparse.Namespace) -> object:
    """``spec`` with the :data:`SPEC_OPTIONS` given on the command line (lists become tuples)."""
    changes = {}
    for field in SPEC_OPTIONS:
        value = getattr(args, field, None)
        if value is not None:
            changes[field] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(spec, **changes) if changes else spec


def _without_residual(spec: object, args: argparse.Namespace) -> object:
    """``spec`` with residual-free MoE stages under ``--no-residual`` (vision experiments only)."""
    if not getattr(args, "no_residual", False):
        return spec
    return dataclasses.replace(spec, settings=spec.settings.replace(residual=False))  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    import torch

    # The thread count is process-wide: restore it, so that a caller (a test session, a notebook)
    # keeps computing with the threads it had — results can differ in the last bit otherwise.
    previous_threads = torch.get_num_threads()
    try:
        return _main(argv)
    finally:
        torch.set_num_threads(previous_threads)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, args.threads))
    out_dir = args.output_dir or (DEFAULT_OUTPUT / "quick" if args.quick else DEFAULT_OUTPUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = "quick_" if args.quick else ""
    command = "python -m hf_moe_routers.experiments " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    start = time.perf_counter()
    if args.replot:
        return _replot(args.experiment, out_dir, prefix)
    # Every experiment runs the same way; EXPERIMENTS names what its module provides for it.
    module = importlib.import_module(f"{__package__}.{args.experiment}")
    spec_class, quick_spec, run = (getattr(module, name) for name in EXPERIMENTS[args.experiment])
    spec = _without_residual(_override(quick_spec() if args.quick else spec_class(), args), args)
    run(spec, out_dir, command=command, prefix=prefix)
    files = [f"{args.experiment}.json", f"{args.experiment}.md"]
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {', '.join(str(out_dir / (prefix + f)) for f in files)} and plots ({minutes:.1f} min)")
    return 0


def _replot(experiment: str, out_dir: Path, prefix: str) -> int:
    import json

    path = out_dir / f"{prefix}{experiment}.json"
    if not path.exists():
        raise SystemExit(f"--replot: {path} does not exist; run the experiment first.")
    module = importlib.import_module(f"{__package__}.{experiment}")
    result = module.render_outputs(json.loads(path.read_text()), out_dir, prefix)
    print(f"re-rendered {path.with_suffix('.md')} and {', '.join(result['plots'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
