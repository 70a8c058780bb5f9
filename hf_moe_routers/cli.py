"""Command line: ``hf-moe-routers <command>`` (also ``python -m hf_moe_routers <command>``).

Commands:
    train        train a routed MoE causal LM (``examples/train_clm.py``; ``train --help`` for flags)
    finetune     patch a saved MoE checkpoint, optionally distil, fine-tune, save
    patch-demo   patch, distil, save and reload a tiny Mixtral with every router
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "train": "train a routed MoE causal LM from scratch (flags: train --help)",
    "finetune": "patch a saved MoE checkpoint, distil, fine-tune and save (flags: finetune --help)",
    "patch-demo": "patch, distil, save and reload a tiny Mixtral with every router",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .trainers.clm import main as train_main

        train_main(argv[1:])
        return 0
    if argv and argv[0] == "finetune":
        from .trainers.finetune import main as finetune_main

        finetune_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="hf-moe-routers", description="Better routers for HF MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name == "patch-demo":
            command.add_argument("--seed", type=int, default=0)
            command.add_argument("--distill-steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.command == "patch-demo":
        from .demo import run_demo

        rows = run_demo(seed=args.seed, distill_steps=args.distill_steps)
        return 0 if all(row["reload_identical"] for row in rows) else 1
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
