"""Command line: ``hf-moe-routers <command>``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-moe-routers", description="Better routers for HF MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="patch, distil, save and reload a tiny Mixtral with every router")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--distill-steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        rows = run_demo(seed=args.seed, distill_steps=args.distill_steps)
        return 0 if all(row["reload_identical"] for row in rows) else 1
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
