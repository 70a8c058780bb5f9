"""The body of each ``hf-moe-routers`` command: ``run_<command>(args) -> exit status``."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

# The commands import the heavy parts (torch, Trainer, datasets, hub client) lazily, when they run:
# `--help` of every command must answer without them.
from .loading import (
    CommandError,
    folder_tokenizer,
    load_config,
    load_model,
    model_folder,
    parse_router_options,
    text_blocks,
    token_batches,
)


def inspect_columns() -> tuple[str, ...]:
    """Columns of `inspect`'s table (hf_moe_routers.metrics names, then parameter metrics); the
    leading load and token metrics are the training summary's, so both reports read the same way.
    (A function: the metrics package imports torch, which `--help` must not wait for.)"""
    from ..metrics.catalog import HEADLINE_METRICS

    return (
        *HEADLINE_METRICS,
        "kth_margin",
        "aux_loss",
        "z_loss",
        "spectral_norm",
        "stable_rank",
        "lipschitz_bound",
    )


def run_patch(args: argparse.Namespace) -> int:
    """Load, patch, optionally distil, save with remote code and a model card; print the reports."""
    import torch

    from ..distillation import distill_router
    from ..modeling.publishing import save_routed_pretrained
    from ..patching import patch_moe_routers

    folder = model_folder(args.model_path)
    router_config = parse_router_options(args.router_type, args.router_kwargs)
    model = load_model(folder)
    tokenizer = folder_tokenizer(folder, args.tokenizer)
    if tokenizer is None:
        print(f"{folder} has no tokenizer (pass --tokenizer): calibrating on random token ids")
        generator = torch.Generator().manual_seed(args.seed)
        blocks = torch.randint(
            0, model.config.vocab_size, (args.num_blocks, args.block_size), generator=generator
        )
    else:
        blocks = text_blocks(
            args.text_file, tokenizer, args.block_size, args.num_blocks, model.config.vocab_size
        )
    batches = token_batches(model, blocks, args.batch_size)
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
    # The card's data, settings and metric table: what this run calibrated (and distilled) on, and
    # the saved routers measured on those same blocks (routing_metrics.json, as a training run has).
    tokens = blocks.shape[0] * blocks.shape[1]
    source = f"`{args.text_file}`" if args.text_file else "the bundled held-out plays"
    if tokenizer is None:
        source = "random token ids (the folder has no tokenizer)"
    distilled_text = f", then distilled to the original gates for {args.distill_steps} steps"
    calibration = (
        f"Not trained: the routers were patched in and calibrated on {blocks.shape[0]} blocks of "
        f"{blocks.shape[1]} tokens ({tokens:,} tokens) of {source}"
        f"{distilled_text if args.distill_steps > 0 else ''}."
    )
    layers, per_layer, measured = inspect_metrics(model, batches)
    metrics: dict[str, float] = {}
    if layers:
        from ..reporting import mean_over_layers

        for name in inspect_columns():  # inspect's means, in the Trainer's eval_router/ keys
            metrics[f"eval_router/{name}"] = mean_over_layers([per_layer[layer][name] for layer in layers])
            metrics.update({f"eval_router/{name}/{layer}": per_layer[layer][name] for layer in layers})
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        Path(args.output_dir, "routing_metrics.json").write_text(
            json.dumps(_json_values(metrics), indent=2, sort_keys=True)
        )
    save_routed_pretrained(
        model,
        args.output_dir,
        tokenizer=tokenizer,
        base_model=args.base_model or str(args.model_path),
        training_data=calibration,
        run_parameters={
            "calibration_blocks": int(blocks.shape[0]),
            "block_size": int(blocks.shape[1]),
            "batch_size": args.batch_size,
            "distill_steps": args.distill_steps,
            "distill_lr": args.distill_lr if args.distill_steps > 0 else None,
            "seed": args.seed,
        },
        metrics=metrics if layers else None,
        metrics_source=(
            f"On the {measured:,} calibration tokens per router, after patching"
            + (" and distillation" if args.distill_steps > 0 else "")
            + " (mean over layers, then per layer):"
        ),
        record_run=True,
    )
    print(
        f"saved the routed model to {args.output_dir}: it loads with `import hf_moe_routers`, or with "
        "trust_remote_code=True where hf-moe-routers is not installed"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Load a routed model, fold its routers into the family's gate and save a stock checkpoint."""
    from ..export import export_to_family

    folder = model_folder(args.model_path)
    model = load_model(folder)
    try:
        plain = export_to_family(model)
    except ValueError as error:
        raise CommandError(str(error)) from None
    plain.save_pretrained(args.output_dir)
    tokenizer = folder_tokenizer(folder, None)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    print(
        f"saved a plain {type(plain).__name__} to {args.output_dir}: stock transformers loads it "
        "without hf-moe-routers and without remote code"
    )
    return 0


def run_card(args: argparse.Namespace) -> int:
    """Render README.md for a saved folder (optionally with a metrics JSON)."""
    from ..cards import folder_model_card, is_generated_card

    folder = model_folder(args.model_path)
    config = load_config(folder)
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


def inspect_metrics(
    model: Any, batches: list[dict[str, Any]]
) -> tuple[list[str], dict[str, dict[str, float]], int]:
    """Per-router metrics over every batch: ``(layers, {layer: {metric: value}}, tokens)``.

    All batches form one pooled capture per router, reported by ``hf_moe_routers.reporting`` (the
    Trainer's computation, with the family's routing probabilities for ``aux_loss``). Only the
    parameters are measured besides the routing itself, so ``lipschitz_bound`` is the router's
    global constant (``inf`` where none exists).
    """
    import torch

    from ..reporting import RouterCapture, RouterCollector, report_captures, routing_scoring

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
    ran = [i for i in range(len(collector.routers)) if logits[i]]
    if not ran:
        return [], {}, 0
    routers = [collector.routers[i] for i in ran]
    # Router inputs are not kept (a [T, H] copy per router): the pooled captures carry none.
    pooled = [RouterCapture(torch.cat(logits[i]), torch.cat(indices[i]), torch.empty(0, 0)) for i in ran]
    per_layer, _ = report_captures(routers, pooled, scoring=routing_scoring(model), measure_inputs=False)
    results = {
        info.layer: {name: per_layer[name][j] for name in inspect_columns()} for j, info in enumerate(routers)
    }
    tokens = max(capture.logits_TE.shape[0] for capture in pooled)
    return list(results), results, tokens


def _json_values(values: dict[str, float]) -> dict[str, float | str]:
    """JSON has no inf/NaN: write them as strings ("inf"), as routing_metrics.json does."""
    return {k: v if math.isfinite(v) else str(v) for k, v in values.items()}


def run_inspect(args: argparse.Namespace) -> int:
    """Print the router config and the per-layer routing metrics of a saved model on a text."""
    from ..families import model_type_of
    from ..modeling import FAMILIES

    folder = model_folder(args.model_path)
    # The text is checked (tokenizer, length against --block_size) before the weights are loaded:
    # a bad text is answered at once, without a loading bar in front of the error.
    vocab_size = load_config(folder).vocab_size  # also refuses an unsupported family
    tokenizer = folder_tokenizer(folder, args.tokenizer)
    if tokenizer is None:
        raise CommandError(f"{str(folder)!r} has no tokenizer files; pass --tokenizer PATH.")
    blocks = text_blocks(args.text_file, tokenizer, args.block_size, args.max_blocks, vocab_size)
    model = load_model(folder)
    layers, per_layer, tokens = inspect_metrics(model, token_batches(model, blocks, args.batch_size))
    config = model.config
    model_type = model_type_of(config)
    adapter = FAMILIES[model_type]
    routed = model_type == adapter.routed_model_type
    router = config.router_config.to_dict() if routed else None
    from ..reporting import mean_over_layers

    means = {
        name: mean_over_layers([v[name] for v in per_layer.values()])
        for name in inspect_columns()
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
    print(f"{'layer':<{width}}" + "".join(f"{name:>16}" for name in inspect_columns()))
    for layer in [*layers, "mean"]:
        values = means if layer == "mean" else per_layer[layer]
        print(f"{layer:<{width}}" + "".join(f"{values[name]:>16.4g}" for name in inspect_columns()))
    return 0


def _benchmarks_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    # benchmarks/ sits next to the package in a source checkout (editable installs included).
    return Path(__file__).resolve().parents[2] / "benchmarks"


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
    from ..scripts.demo import run_demo

    rows = run_demo(seed=args.seed, distill_steps=args.distill_steps)
    return 0 if all(row["reload_identical"] for row in rows) else 1
