"""``python -m hf_moe_routers.experiments {interference,sensitivity,lm} [--quick] [options]``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

DEFAULT_OUTPUT = Path("benchmarks/results")


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


def _override(spec: object, args: argparse.Namespace, fields: dict[str, str]) -> object:
    changes = {}
    for arg, field in fields.items():
        value = getattr(args, arg, None)
        if value is not None:
            changes[field] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(spec, **changes) if changes else spec


def _without_residual(spec: object, args: argparse.Namespace) -> object:
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
    common = {"seeds": "seeds", "routers": "routers", "episodes_per_class": "episodes_per_class"}
    if args.experiment == "interference":
        from .interference import InterferenceSpec, quick_spec, run_interference

        spec = quick_spec() if args.quick else InterferenceSpec()
        spec = _override(spec, args, {**common, "datasets": "datasets", "depths": "depths"})
        spec = _without_residual(spec, args)
        run_interference(spec, out_dir, command=command, prefix=prefix)
        files = ["interference.json", "interference.md"]
    elif args.experiment == "sensitivity":
        from .sensitivity import SensitivitySpec, quick_sensitivity_spec, run_sensitivity

        spec = quick_sensitivity_spec() if args.quick else SensitivitySpec()
        spec = _override(spec, args, {**common, "dataset": "dataset", "depth": "depth"})
        spec = _without_residual(spec, args)
        run_sensitivity(spec, out_dir, command=command, prefix=prefix)
        files = ["sensitivity.json", "sensitivity.md"]
    else:
        from .lm import LMSpec, quick_lm_spec, run_lm

        spec = quick_lm_spec() if args.quick else LMSpec()
        spec = _override(spec, args, {"seeds": "seeds", "routers": "routers", "max_steps": "max_steps"})
        run_lm(spec, out_dir, command=command, prefix=prefix)
        files = ["lm.json", "lm.md"]
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {', '.join(str(out_dir / (prefix + f)) for f in files)} and plots ({minutes:.1f} min)")
    return 0


def _replot(experiment: str, out_dir: Path, prefix: str) -> int:
    import importlib
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
