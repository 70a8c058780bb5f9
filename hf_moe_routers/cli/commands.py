"""The body of each ``hf-moe-routers`` command: ``run_<command>(args) -> exit status``."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable
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
    domain_names, domain_blocks = None, None
    if args.text_file is None and tokenizer is not None:  # the bundled held-out plays are the domains
        domain_names, domain_blocks = bundled_domain_blocks(tokenizer, args.block_size, args.num_blocks)
        if domain_blocks.shape != blocks.shape:  # pragma: no cover - the same recipe as text_blocks
            domain_names, domain_blocks = None, None
    special = _Specialisation(
        batches, domain_blocks=domain_blocks, domain_names=domain_names, batch_size=args.batch_size
    )
    layers, per_layer, measured = inspect_metrics(model, batches, on_batch=special)
    metrics: dict[str, float] = {}
    if layers:
        from ..reporting import mean_over_layers, specialisation_report

        for name in inspect_columns():  # inspect's means, in the Trainer's eval_router/ keys
            metrics[f"eval_router/{name}"] = mean_over_layers([per_layer[layer][name] for layer in layers])
            metrics.update({f"eval_router/{name}/{layer}": per_layer[layer][name] for layer in layers})
        if special.window is not None:  # and the specialisation metrics, as inspect reports them
            for name, values in specialisation_report(special.window).items():
                metrics[f"eval_router/{name}"] = mean_over_layers(values)
                metrics.update({f"eval_router/{name}/{layer}": v for layer, v in zip(special.layers, values)})
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
    model: Any,
    batches: list[dict[str, Any]],
    *,
    on_batch: Callable[[int, list[Any], list[Any]], None] | None = None,
) -> tuple[list[str], dict[str, dict[str, float]], int]:
    """Per-router metrics over every batch: ``(layers, {layer: {metric: value}}, tokens)``.

    All batches form one pooled capture per router, reported by ``hf_moe_routers.reporting`` (the
    Trainer's computation, with the family's routing probabilities for ``aux_loss``). Only the
    parameters are measured besides the routing itself, so ``lipschitz_bound`` is the router's
    global constant (``inf`` where none exists). ``on_batch(index, routers, captures)`` sees each
    batch's captures as they come (``inspect``'s specialisation counts).
    """
    import torch

    from ..reporting import RouterCapture, RouterCollector, report_captures, routing_scoring

    collector = RouterCollector(model)
    logits: list[list[torch.Tensor]] = [[] for _ in collector.routers]
    indices: list[list[torch.Tensor]] = [[] for _ in collector.routers]
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                collector.start()
                model(**batch)
                captures = collector.stop()
                for i, capture in enumerate(captures):
                    if capture is not None:
                        logits[i].append(capture.logits_TE.float())
                        indices[i].append(capture.indices_TK)
                if on_batch is not None:
                    on_batch(index, collector.routers, captures)
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


def routed_indices(model: Any, batches: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Each router's top-k choices on each batch: ``(layer names, [batch][router] -> [T, K] or None)``."""
    import torch

    from ..reporting import RouterCollector

    collector = RouterCollector(model)
    chosen: list[list[Any]] = []
    try:
        with torch.no_grad():
            for batch in batches:
                collector.start()
                model(**batch)
                chosen.append([None if c is None else c.indices_TK.clone() for c in collector.stop()])
    finally:
        collector.remove()
    return [info.layer for info in collector.routers], chosen


def bundled_domain_blocks(tokenizer: Any, block_size: int, max_blocks: int) -> tuple[list[str], Any]:
    """The play of every token of the default ``inspect`` text: ``(play titles, ids [N, block_size])``.

    The blocks are those ``text_blocks(None, ...)`` builds from the bundled held-out plays (both
    come from ``data_utils.token_and_document_blocks``), with each token replaced by the index of
    its play in ``titles`` (the EOS after a play belongs to that play).
    """
    from .. import data_utils

    titles = [entry["title"] for entry in data_utils.bundled_corpus_manifest()["splits"]["validation"]]
    texts = data_utils.bundled_corpus()["validation"]
    _, documents = data_utils.token_and_document_blocks(texts, tokenizer, block_size, max_blocks)
    return titles, documents


def _json_number(value: float) -> float | str:
    """JSON has no inf/NaN: write them as strings ("inf"), as routing_metrics.json does."""
    return value if math.isfinite(value) else str(value)


def _json_values(values: dict[str, float]) -> dict[str, float | str]:
    """:func:`_json_number` of every value."""
    return {k: _json_number(v) for k, v in values.items()}


class _Specialisation:
    """``inspect``'s specialisation counts, fed batch by batch from ``inspect_metrics``' captures."""

    def __init__(
        self,
        batches: list[dict[str, Any]],
        *,
        domain_blocks: Any = None,
        domain_names: list[str] | None = None,
        batch_size: int,
        reference: tuple[list[str], list[list[Any]]] | None = None,
    ):
        self.batches = batches
        self.domain_blocks = domain_blocks
        self.domain_names = domain_names or []
        self.batch_size = batch_size
        self.reference = reference
        self.window: Any = None
        self.layers: list[str] = []
        self.slot_of: dict[int, int] = {}  # router index -> the window's layer

    def __call__(self, index: int, routers: list[Any], captures: list[Any]) -> None:
        from ..reporting import add_specialisation, specialisation_window

        if self.window is None:  # the routers that run: what inspect_metrics reports
            ran = [i for i, capture in enumerate(captures) if capture is not None]
            self.slot_of = {i: j for j, i in enumerate(ran)}
            self.layers = [routers[i].layer for i in ran]
            self.window = specialisation_window([routers[i] for i in ran], num_domains=len(self.domain_names))
            if self.reference is not None:
                missing = sorted(set(self.layers) - set(self.reference[0]))
                if missing:
                    raise CommandError(
                        f"--reference has no router for layer(s) {', '.join(missing)}: "
                        "it must be a checkpoint of the same architecture."
                    )
        kept = [captures[i] for i in self.slot_of]
        token_ids = self.batches[index]["input_ids"].reshape(-1)
        domains = None
        if self.domain_blocks is not None:
            start = index * self.batch_size
            domains = self.domain_blocks[start : start + self.batch_size].reshape(-1)
        references = None
        if self.reference is not None:
            names, chosen = self.reference
            references = [chosen[index][names.index(layer)] for layer in self.layers]
            for layer, mine, theirs in zip(self.layers, kept, references):
                if mine is not None and (theirs is None or theirs.shape != mine.indices_TK.shape):
                    got = "nothing" if theirs is None else f"top-k {tuple(theirs.shape)}"
                    raise CommandError(
                        f"--reference routed {got} at {layer} where the model routed top-k "
                        f"{tuple(mine.indices_TK.shape)}: it must have the same experts per token."
                    )
        add_specialisation(self.window, kept, token_ids, domain_ids=domains, reference_indices=references)


def _inspect_reference(path: str, vocab_size: int, batches: list[dict[str, Any]]) -> tuple[list[str], list]:
    """The reference checkpoint's routing of ``batches`` (``--reference``); the model is freed after."""
    folder = model_folder(path)
    reference_vocab = load_config(folder).vocab_size
    if reference_vocab != vocab_size:
        raise CommandError(
            f"--reference {path!r} has a vocabulary of {reference_vocab} tokens but the model has "
            f"{vocab_size}: router saturation compares the routing of the same tokens."
        )
    return routed_indices(load_model(folder), batches)


def _column_table(layers: list[str], values: dict[str, list[float]], means: dict[str, float]) -> list[str]:
    names = list(values)
    width = max(len("layer"), *(len(layer) for layer in layers))
    widths = [max(16, len(name) + 1) for name in names]  # 16: the table inspect always printed
    lines = [f"{'layer':<{width}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for i, layer in enumerate([*layers, "mean"]):
        row = [means[n] if layer == "mean" else values[n][i] for n in names]
        lines.append(f"{layer:<{width}}" + "".join(f"{v:>{w}.4g}" for v, w in zip(row, widths)))
    return lines


def run_inspect(args: argparse.Namespace) -> int:
    """Print the router config and the per-layer routing metrics of a saved model on a text."""
    from ..families import model_type_of
    from ..modeling import FAMILIES

    folder = model_folder(args.model_path)
    if args.min_count < 1:
        raise CommandError(f"--min_count must be at least 1; got {args.min_count}.")
    # The text is checked (tokenizer, length against --block_size) before the weights are loaded:
    # a bad text is answered at once, without a loading bar in front of the error.
    vocab_size = load_config(folder).vocab_size  # also refuses an unsupported family
    tokenizer = folder_tokenizer(folder, args.tokenizer)
    if tokenizer is None:
        raise CommandError(f"{str(folder)!r} has no tokenizer files; pass --tokenizer PATH.")
    blocks = text_blocks(args.text_file, tokenizer, args.block_size, args.max_blocks, vocab_size)
    domain_names, domain_blocks = None, None
    if args.text_file is None:  # the bundled held-out plays: each play is a domain
        domain_names, domain_blocks = bundled_domain_blocks(tokenizer, args.block_size, args.max_blocks)
        if domain_blocks.shape != blocks.shape:  # pragma: no cover - the same recipe as text_blocks
            domain_names, domain_blocks = None, None
    if args.reference is not None:
        model_folder(args.reference)  # a bad path is answered before any weights load
    model = load_model(folder)
    batches = token_batches(model, blocks, args.batch_size)
    reference = None
    if args.reference is not None:
        reference = _inspect_reference(args.reference, vocab_size, batches)
    special = _Specialisation(
        batches,
        domain_blocks=domain_blocks,
        domain_names=domain_names,
        batch_size=args.batch_size,
        reference=reference,
    )
    layers, per_layer, tokens = inspect_metrics(model, batches, on_batch=special)
    config = model.config
    model_type = model_type_of(config)
    adapter = FAMILIES[model_type]
    routed = model_type == adapter.routed_model_type
    router = config.router_config.to_dict() if routed else None
    from ..reporting import coactivation_pairs, domain_report, mean_over_layers, specialisation_report

    means = {
        name: mean_over_layers([v[name] for v in per_layer.values()])
        for name in inspect_columns()
        if per_layer
    }
    special_values: dict[str, list[float]] = {}
    domains: dict[str, dict[str, Any]] = {}
    pairs: dict[str, list[dict[str, Any]]] = {}
    if special.window is not None:
        special_values = specialisation_report(special.window, min_count=args.min_count)
        if domain_names:
            domains = domain_report(special.window, domain_names)
            for row in domains.values():
                row["mean"] = {name: mean_over_layers(row[name]) for name in ("domain_tv", "domain_kl")}
        pairs = dict(zip(special.layers, coactivation_pairs(special.window)))
        if args.plot_coactivation:
            from ..reporting.plots import plot_coactivation

            plot_coactivation(special.window.coactivation(), special.layers, path=args.plot_coactivation)
        for name, values in special_values.items():
            for layer, value in zip(special.layers, values):
                per_layer[layer][name] = value
            means[name] = mean_over_layers(values)
    if args.output_metrics:
        flat: dict[str, float] = {}
        for name, mean in means.items():  # the Trainer's eval_router/ keys, which cards read
            flat[f"eval_router/{name}"] = mean
            flat.update({f"eval_router/{name}/{layer}": per_layer[layer][name] for layer in layers})
        for title, row in domains.items():
            flat.update({f"eval_router_domains/{title}/{n}": v for n, v in row["mean"].items()})
        Path(args.output_metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_metrics).write_text(json.dumps(_json_values(flat), indent=2, sort_keys=True))
    settings = {
        "min_count": args.min_count,
        "token_expert_mi": "bits, Miller-Madow corrected",
        "domain_kl": "nats",
        "reference": args.reference,
        "domains": "the bundled held-out plays" if domain_names else None,
    }
    if args.json:
        report = {
            "model_type": model_type,
            "family": adapter.name,
            "router": router,
            "tokens": tokens,
            "layers": {layer: _json_values(values) for layer, values in per_layer.items()},
            "mean": _json_values(means),
            "specialisation": {
                **settings,
                "domain_report": {
                    title: {
                        "tokens": row["tokens"],
                        **{n: [_json_number(v) for v in row[n]] for n in ("domain_tv", "domain_kl")},
                        "mean": _json_values(row["mean"]),
                    }
                    for title, row in domains.items()
                }
                or None,
                "coactivation_top_pairs": pairs,
            },
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
    columns = {name: [per_layer[layer][name] for layer in layers] for name in inspect_columns()}
    print("\n".join(_column_table(layers, columns, means)))
    if special_values:
        against = f"; saturation against {args.reference}" if args.reference else ""
        print(
            f"\nexpert specialisation (vocabulary: ids seen >= {args.min_count} times; MI in bits, "
            f"Miller-Madow corrected{against}):"
        )
        print("\n".join(_column_table(special.layers, special_values, means)))
    if domains:
        print(
            "\ndomains: the bundled held-out plays (each play's load against all plays', mean over layers):"
        )
        width = max(len(title) for title in domains)
        for title, row in domains.items():
            print(
                f"  {title:<{width}}  {row['tokens']:>7,} tokens  domain_tv {row['mean']['domain_tv']:.4g}"
                f"  domain_kl {row['mean']['domain_kl']:.4g}"
            )
    if pairs:
        print("\nstrongest co-activation P(b | a), expert a -> b:")
        for layer, top in pairs.items():
            print(f"  {layer}: " + ", ".join(f"{p['a']} -> {p['b']} {p['p']:.3f}" for p in top))
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
