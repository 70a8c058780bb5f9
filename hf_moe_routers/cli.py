"""Command line: ``hf-moe-routers <command>`` (also ``python -m hf_moe_routers <command>``).

Commands:
    patch        load a local MoE checkpoint, swap its routers, optionally distil, save (with remote code)
    train        train a routed MoE causal LM (``examples/train_clm.py``; ``train --help`` for flags)
    finetune     patch a saved MoE checkpoint, optionally distil, fine-tune, save
    bench        run a benchmark script of ``benchmarks/`` (a source checkout)
    card         render the model card (README.md) of a saved model folder
    inspect      print a saved model's router config and its routing metrics on a text
    export       save a routed model whose routers are linear in form as a plain family checkpoint
    patch-demo   patch, distil, save and reload a tiny Mixtral with every router

Every command takes ``--help``. Bad input (a path that is not a model, an unsupported family, bad
router options) exits with status 2 and a message naming the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
# Columns of `inspect`'s table (hf_moe_routers.metrics names, then parameter metrics).
INSPECT_METRICS = (
    "load_entropy",
    "load_cv",
    "max_load_ratio",
    "dead_experts",
    "token_entropy",
    "top1_prob",
    "kth_margin",
    "aux_loss",
    "z_loss",
    "spectral_norm",
    "stable_rank",
    "lipschitz_bound",
)


class CommandError(Exception):
    """Bad user input: reported as ``hf-moe-routers <command>: error: <message>`` with exit status 2."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _model_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise CommandError(f"{path!r} is not a folder (expected a model saved with save_pretrained).")
    if not (folder / "config.json").is_file():
        raise CommandError(f"{path!r} is not a saved model folder: it has no config.json.")
    return folder


def _load_config(folder: Path) -> Any:
    """The folder's config (routed types resolve: the package is imported); unsupported families fail."""
    from transformers import AutoConfig

    from .modeling import FAMILIES, supported_families

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"cannot read the model config in {str(folder)!r}: {error}") from None
    if config.model_type not in FAMILIES:
        raise CommandError(
            f"unsupported model family {config.model_type!r} in {str(folder)!r}; supported: "
            f"{', '.join(supported_families())} (and their routed_* forms)."
        )
    return config


def _load_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = _load_config(folder)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


def _tokenizer(folder: Path, tokenizer_path: str | None) -> Any | None:
    """``--tokenizer``, else the folder's own tokenizer, else None."""
    from transformers import AutoTokenizer

    source = Path(tokenizer_path) if tokenizer_path else folder
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any((source / name).is_file() for name in files):
        if tokenizer_path:
            raise CommandError(f"--tokenizer {tokenizer_path!r} has no tokenizer files ({', '.join(files)}).")
        return None
    return AutoTokenizer.from_pretrained(source)


def _text_blocks(
    text_file: str | None, tokenizer: Any, block_size: int, max_blocks: int, vocab_size: int
) -> Any:
    """Token blocks ``[N, block_size]`` of ``text_file`` (default: the bundled validation plays)."""
    from . import data_utils

    if len(tokenizer) > vocab_size:
        raise CommandError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size}."
        )
    try:
        texts = (
            data_utils.load_text_files([text_file])
            if text_file
            else data_utils.bundled_corpus()["validation"]
        )
        blocks, _ = data_utils.build_lm_datasets(
            texts, None, tokenizer, block_size, max_train_blocks=max_blocks
        )
    except (OSError, ValueError) as error:
        raise CommandError(f"--text_file: {error}") from None
    return blocks.blocks


def _batches(model: Any, blocks: Any, batch_size: int) -> list[dict[str, Any]]:
    batches = []
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        batch = {"input_ids": ids}
        if model.config.is_encoder_decoder:
            batch["decoder_input_ids"] = ids  # routing statistics only: the decoder reads the same text
        batches.append(batch)
    return batches


def _router_config(router_type: str, router_kwargs: str) -> Any:
    from .routers import RouterConfig

    try:
        kwargs = json.loads(router_kwargs)
    except json.JSONDecodeError as error:
        raise CommandError(
            f"--router_kwargs must be a JSON object; got {router_kwargs!r} ({error})."
        ) from None
    if not isinstance(kwargs, dict):
        raise CommandError(f"--router_kwargs must be a JSON object; got {router_kwargs!r}.")
    if "router_type" in kwargs:
        raise CommandError("--router_kwargs must not contain router_type; use --router_type.")
    try:
        return RouterConfig.from_dict({"router_type": router_type, **kwargs})
    except ValueError as error:
        raise CommandError(f"bad router options: {error}") from None


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def run_patch(args: argparse.Namespace) -> int:
    """Load, patch, optionally distil, save with remote code and a model card; print the reports."""
    import torch

    from .distillation import distill_router
    from .modeling.publishing import save_routed_pretrained
    from .patching import patch_moe_routers

    folder = _model_folder(args.model_path)
    router_config = _router_config(args.router_type, args.router_kwargs)
    model = _load_model(folder)
    tokenizer = _tokenizer(folder, args.tokenizer)
    if tokenizer is None:
        print(f"{folder} has no tokenizer (pass --tokenizer): calibrating on random token ids")
        generator = torch.Generator().manual_seed(args.seed)
        blocks = torch.randint(
            0, model.config.vocab_size, (args.num_blocks, args.block_size), generator=generator
        )
    else:
        blocks = _text_blocks(
            args.text_file, tokenizer, args.block_size, args.num_blocks, model.config.vocab_size
        )
    batches = _batches(model, blocks, args.batch_size)
    try:
        model, report = patch_moe_routers(
            model, router_config, calibration_batches=batches, return_report=True, seed=args.seed
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"patched: {report}")
    for name, values in report.layers.items():
        print(f"  {name}: top-k {values['topk_agreement']:.4f}, top-1 {values['top1_agreement']:.4f}")
    if args.distill_steps > 0:
        distilled = distill_router(model, batches, steps=args.distill_steps, lr=args.distill_lr)
        print(f"after {args.distill_steps} distillation steps: {distilled}")
        model.router_patch_report = distilled  # the card reports the routing that is saved
    save_routed_pretrained(
        model, args.output_dir, tokenizer=tokenizer, base_model=args.base_model or str(args.model_path)
    )
    print(
        f"saved the routed model to {args.output_dir}: it loads with `import hf_moe_routers`, or with "
        "trust_remote_code=True where hf-moe-routers is not installed"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Load a routed model, fold its routers into the family's gate and save a stock checkpoint."""
    from .export import export_to_family

    folder = _model_folder(args.model_path)
    model = _load_model(folder)
    try:
        plain = export_to_family(model)
    except ValueError as error:
        raise CommandError(str(error)) from None
    plain.save_pretrained(args.output_dir)
    tokenizer = _tokenizer(folder, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    print(
        f"saved a plain {type(plain).__name__} to {args.output_dir}: stock transformers loads it "
        "without hf-moe-routers and without remote code"
    )
    return 0


def run_card(args: argparse.Namespace) -> int:
    """Render README.md for a saved folder (optionally with a metrics JSON)."""
    from .cards import folder_model_card, is_generated_card

    folder = _model_folder(args.model_path)
    config = _load_config(folder)
    metrics = None
    if args.metrics:
        try:
            metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CommandError(f"--metrics {args.metrics!r} is not a readable JSON file ({error}).") from None
        if not isinstance(metrics, dict):
            raise CommandError(f"--metrics {args.metrics!r} must hold a JSON object of metric values.")
    card = folder_model_card(
        config,
        folder,
        metrics=metrics,
        model_id=args.model_id,
        base_model=args.base_model,
        datasets=args.datasets,
        training_data=args.training_data,
        license=args.license,
        language=args.language,
    )
    if args.print:
        print(str(card))
        return 0
    output = Path(args.output) if args.output else folder / "README.md"
    if output.exists() and not args.force and not is_generated_card(output):
        raise CommandError(
            f"{output} exists and was not written by hf-moe-routers; pass --force or --output."
        )
    card.save(output)
    print(f"wrote {output}")
    return 0


def _inspect_metrics(
    model: Any, batches: list[dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, float]], int]:
    """Per-router metrics over every batch: ``(layers, {layer: {metric: value}}, tokens)``."""
    import torch

    from . import metrics as M
    from .reporting.collector import RouterCollector

    collector = RouterCollector(model)
    logits: list[list[torch.Tensor]] = [[] for _ in collector.routers]
    indices: list[list[torch.Tensor]] = [[] for _ in collector.routers]
    try:
        with torch.no_grad():
            for batch in batches:
                collector.start()
                model(**batch)
                for i, capture in enumerate(collector.stop()):
                    if capture is not None:
                        logits[i].append(capture.logits_TE.float())
                        indices[i].append(capture.indices_TK)
    finally:
        collector.remove()
    results: dict[str, dict[str, float]] = {}
    tokens = 0
    for i, info in enumerate(collector.routers):
        if not logits[i]:
            continue
        logits_TE, indices_TK = torch.cat(logits[i]), torch.cat(indices[i])
        tokens = max(tokens, logits_TE.shape[0])
        values = {k: float(v) for k, v in M.routing_metrics(logits_TE, indices_TK, top_k=info.top_k).items()}
        matrix = info.gate_matrix()
        values["spectral_norm"] = float(M.spectral_norm(matrix))
        values["stable_rank"] = float(M.stable_rank(matrix))
        values["lipschitz_bound"] = float(info.lipschitz_bound())
        results[info.layer] = values
    return list(results), results, tokens


def _json_values(values: dict[str, float]) -> dict[str, float | str]:
    """JSON has no inf/NaN: write them as strings ("inf"), as routing_metrics.json does."""
    return {k: v if math.isfinite(v) else str(v) for k, v in values.items()}


def run_inspect(args: argparse.Namespace) -> int:
    """Print the router config and the per-layer routing metrics of a saved model on a text."""
    from .families import model_type_of
    from .modeling import FAMILIES

    folder = _model_folder(args.model_path)
    model = _load_model(folder)
    tokenizer = _tokenizer(folder, args.tokenizer)
    if tokenizer is None:
        raise CommandError(f"{str(folder)!r} has no tokenizer files; pass --tokenizer PATH.")
    blocks = _text_blocks(
        args.text_file, tokenizer, args.block_size, args.max_blocks, model.config.vocab_size
    )
    layers, per_layer, tokens = _inspect_metrics(model, _batches(model, blocks, args.batch_size))
    config = model.config
    model_type = model_type_of(config)
    adapter = FAMILIES[model_type]
    routed = model_type == adapter.routed_model_type
    router = config.router_config.to_dict() if routed else None
    means = {
        name: sum(v[name] for v in per_layer.values()) / len(per_layer)
        for name in INSPECT_METRICS
        if per_layer
    }
    if args.json:
        report = {
            "model_type": model_type,
            "family": adapter.name,
            "router": router,
            "tokens": tokens,
            "layers": {layer: _json_values(values) for layer, values in per_layer.items()},
            "mean": _json_values(means),
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"{folder}: {adapter.name} ({model_type}), {type(model).__name__}")
    print(
        "router: "
        + (json.dumps(router, sort_keys=True) if router else f"{adapter.name}'s own router (not patched)")
    )
    print(
        f"routing metrics on {blocks.shape[0]} blocks of {blocks.shape[1]} tokens ({tokens} tokens per router):"
    )
    width = max(len("layer"), *(len(layer) for layer in layers))
    print(f"{'layer':<{width}}" + "".join(f"{name:>16}" for name in INSPECT_METRICS))
    for layer in [*layers, "mean"]:
        values = means if layer == "mean" else per_layer[layer]
        print(f"{layer:<{width}}" + "".join(f"{values[name]:>16.4g}" for name in INSPECT_METRICS))
    return 0


def _benchmarks_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    # benchmarks/ sits next to the package in a source checkout (editable installs included).
    return Path(__file__).resolve().parent.parent / "benchmarks"


def run_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/bench_<name>.py`` with the remaining arguments, in this Python."""
    folder = _benchmarks_dir(args.benchmarks_dir)
    available = (
        sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py")) if folder.is_dir() else []
    )
    if args.list:
        print("\n".join(available) if available else f"no benchmarks in {folder}")
        return 0
    script = folder / f"bench_{args.name}.py"
    if not script.is_file():
        hint = f"available: {', '.join(available)}" if available else "benchmarks run from a source checkout"
        raise CommandError(
            f"no benchmark {args.name!r}: {script} does not exist ({hint}; or pass --benchmarks_dir)."
        )
    print(f"running {script} {' '.join(args.bench_args)}", flush=True)
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def run_patch_demo(args: argparse.Namespace) -> int:
    from .scripts.demo import run_demo

    rows = run_demo(seed=args.seed, distill_steps=args.distill_steps)
    return 0 if all(row["reload_identical"] for row in rows) else 1


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser (used to report errors under its name)."""
    parser = argparse.ArgumentParser(
        prog="hf-moe-routers",
        description="Better routers for Hugging Face MoE models: patch, train, inspect, publish.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}

    patch = parsers["patch"]
    patch.add_argument(
        "model_path", help="a local Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE / Switch checkpoint folder"
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
    demo.add_argument("--distill-steps", type=int, default=100)
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
    if argv and argv[0] == "train":
        from .scripts.clm import main as train_main

        train_main(argv[1:])
        return 0
    if argv and argv[0] == "finetune":
        from .scripts.finetune import main as finetune_main

        finetune_main(argv[1:])
        return 0
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except CommandError as error:
        parsers[args.command].error(str(error))  # prints usage and the message, exits with 2
    return 2  # pragma: no cover - error() does not return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
