"""Command line: ``hf-moe-routers <command>`` (also ``python -m hf_moe_routers <command>``).

Commands:
    patch        load a local MoE checkpoint, swap its routers, optionally distil, save (with remote code)
    train        train a routed MoE causal LM (``examples/train_clm.py``; ``train --help`` for flags)
    finetune     patch a saved MoE checkpoint, optionally distil, fine-tune, save
    bench        run a benchmark script of ``benchmarks/`` (a source checkout)
    card         render the model card (README.md) of a saved model folder
    inspect      print a saved model's router config, its routing metrics and expert specialisation
                 on a text (saturation against ``--reference``, domains = the bundled plays)
    export       save a routed model whose routers are linear in form as a plain family checkpoint
    patch-demo   patch, distil, save and reload a tiny Mixtral with every router

Every command takes ``--help``. Bad input (a path that is not a model, an unsupported family, bad
router options) exits with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from .commands import (
    inspect_columns,
    run_bench,
    run_card,
    run_export,
    run_inspect,
    run_patch,
    run_patch_demo,
)
from .help_cache import cached_help, wants_help
from .loading import CommandError

__all__ = [
    "COMMANDS",
    "inspect_columns",
    "CommandError",
    "CommandParser",
    "build_parser",
    "main",
    "usage_error",
]

COMMANDS = {
    "patch": "load a local MoE checkpoint, swap its routers, optionally distil, save",
    "train": "train a routed MoE causal LM from scratch (flags: train --help)",
    "finetune": "patch a saved MoE checkpoint, distil, fine-tune and save (flags: finetune --help)",
    "bench": "run a benchmark of benchmarks/ (e.g. bench dispatch --device cpu)",
    "card": "render the model card (README.md) of a saved model folder",
    "inspect": "print a saved model's router config and routing metrics on a text file",
    "export": "save a routed model (linear or SR-MoE linear routers) as a plain family checkpoint",
    "patch-demo": "patch, distil, save and reload a tiny Mixtral with every router",
}


#: Commands whose flags belong to a training script (HfArgumentParser over TrainingArguments).
TRAINING_COMMANDS = ("train", "finetune")


def usage_error(prog: str, message: str) -> NoReturn:
    """Report bad input the way every command does: one line naming the problem, one line saying
    where the options are (not argparse's whole usage block, which buries the message), status 2."""
    message = " ".join(str(message).split())  # one line, whatever the source wrote
    sys.stderr.write(f"{prog}: error: {message}\nrun `{prog} --help` for the options\n")
    sys.exit(2)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are :func:`usage_error`'s two short lines.

    Sub-parsers are created with the parent's class, so every command reports the same way.
    """

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser (used to report errors under its name)."""
    parser = CommandParser(
        prog="hf-moe-routers",
        description="Better routers for Hugging Face MoE models: patch, train, inspect, publish.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}

    patch = parsers["patch"]
    patch.add_argument(
        "model_path",
        help="a local checkpoint folder of a supported family: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, "
        "DeepSeek-V3, gpt-oss or Switch Transformers",
    )
    patch.add_argument("--router_type", required=True, help="linear, sr_moe, l2r or cosine")
    patch.add_argument(
        "--router_kwargs", default="{}", help="router config fields as JSON, e.g. '{\"rank\": 16}'"
    )
    patch.add_argument("--output_dir", required=True, help="where to save the routed model")
    patch.add_argument("--distill_steps", type=int, default=0, help="router distillation steps (0: none)")
    patch.add_argument("--distill_lr", type=float, default=1e-2)
    patch.add_argument("--text_file", default=None, help="calibration text (default: the bundled corpus)")
    patch.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's own)")
    patch.add_argument("--block_size", type=int, default=64, help="tokens per calibration sequence")
    patch.add_argument("--num_blocks", type=int, default=16, help="calibration sequences")
    patch.add_argument("--batch_size", type=int, default=8)
    patch.add_argument("--base_model", default=None, help="Hub id of the checkpoint, for the model card")
    patch.add_argument("--seed", type=int, default=0)

    card = parsers["card"]
    card.add_argument("model_path", help="a saved model folder")
    card.add_argument(
        "--metrics", default=None, help="metrics JSON (default: the folder's routing_metrics.json)"
    )
    card.add_argument("--output", default=None, help="where to write (default: MODEL_PATH/README.md)")
    card.add_argument("--print", action="store_true", help="print the card instead of writing it")
    card.add_argument(
        "--force", action="store_true", help="overwrite a README.md not written by hf-moe-routers"
    )
    card.add_argument(
        "--model_id", default=None, help="Hub repo id for the usage snippet (default: the path)"
    )
    card.add_argument("--base_model", default=None, help="the checkpoint the routers were swapped into")
    card.add_argument("--datasets", nargs="*", default=None, help="Hub dataset ids")
    card.add_argument("--training_data", default=None, help="free text describing the training data")
    card.add_argument("--license", default=None)
    card.add_argument("--language", nargs="*", default=None)

    inspect = parsers["inspect"]
    inspect.add_argument("model_path", help="a saved model folder")
    inspect.add_argument(
        "--text_file", default=None, help="text to route (default: the bundled held-out plays)"
    )
    inspect.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's own)")
    inspect.add_argument("--block_size", type=int, default=128)
    inspect.add_argument("--max_blocks", type=int, default=16)
    inspect.add_argument("--batch_size", type=int, default=8)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument(
        "--reference",
        default=None,
        metavar="PATH",
        help="a saved checkpoint of the same architecture (e.g. the final one): router saturation, "
        "the share of each token's top-k that it also picks on the same tokens",
    )
    inspect.add_argument(
        "--min_count",
        type=int,
        default=5,
        help="vocabulary specialisation counts token ids seen at least this often (default: 5)",
    )
    inspect.add_argument(
        "--output_metrics",
        default=None,
        metavar="PATH",
        help="also write the values as eval_router/<metric>[/<layer>] JSON (routing_metrics.json, "
        "which `card` reads)",
    )
    inspect.add_argument(
        "--plot_coactivation",
        default=None,
        metavar="PNG",
        help="save the expert co-activation heatmaps P(b | a), one panel per layer",
    )

    bench = parsers["bench"]
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    bench.add_argument("--benchmarks_dir", default=None, help="default: benchmarks/ of the source checkout")
    bench.add_argument(
        "name", nargs="?", default="dispatch", help="runs benchmarks/bench_NAME.py (default: dispatch)"
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark script")

    export = parsers["export"]
    export.add_argument("model_path", help="a saved routed model folder (linear or SR-MoE linear routers)")
    export.add_argument("--output_dir", required=True, help="where to save the plain family checkpoint")

    demo = parsers["patch-demo"]
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--distill_steps", type=int, default=100, help="router distillation steps")
    # The old spelling still works; hidden, so that the help shows patch's spelling only.
    demo.add_argument("--distill-steps", dest="distill_steps", type=int, help=argparse.SUPPRESS)
    return parser, parsers


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "patch": run_patch,
    "card": run_card,
    "inspect": run_inspect,
    "bench": run_bench,
    "export": run_export,
    "patch-demo": run_patch_demo,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (argparse and ``CommandError`` exit with 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # train and finetune own their flags (HfArgumentParser over TrainingArguments): hand them over.
    if argv and argv[0] in TRAINING_COMMANDS:
        return run_training(argv[0], argv[1:])
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except CommandError as error:
        parsers[args.command].error(str(error))  # prints usage and the message, exits with 2
    return 2  # pragma: no cover - error() does not return


def run_training(command: str, argv: list[str]) -> int:
    """Run ``train`` (``scripts.clm``) or ``finetune`` (``scripts.finetune``) on ``argv``.

    The scripts raise ``UsageError`` for bad input (flags, paths, data that does not fit them),
    reported here as every command reports bad input; any other exception is an internal error
    and keeps its traceback.
    """
    prog = f"hf-moe-routers {command}"
    if wants_help(argv):
        # Rendered by the live parser once per installation and code version (help_cache.py): the
        # parser needs TrainingArguments, whose import alone takes seconds.
        sys.stdout.write(cached_help(command, lambda help_argv: _script_main(command)(help_argv, prog=prog)))
        sys.exit(0)  # as argparse does after printing the help of every other command
    from ..scripts.common import UsageError

    try:
        _script_main(command)(argv, prog=prog)
    except UsageError as error:
        usage_error(prog, str(error))
    return 0


def _script_main(command: str) -> Callable[..., object]:
    """The ``main`` of the training script behind ``command``.

    Imported here, not at the top: the training stack is what ``--help`` of the other commands
    must not wait for.
    """
    if command == "train":
        from ..scripts.clm import main as script_main
    else:
        from ..scripts.finetune import main as script_main
    return script_main


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
