"""The pieces of a model card: fixed texts, value formatting, the routing-metric table and the
training information read from ``TrainingArguments`` / ``TrainerState``. ``model_card.py`` puts
them into the template."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..metrics.catalog import METRIC_DESCRIPTIONS
from ..records import RoutingHistory

__all__ = [
    "CITATIONS",
    "METRIC_DESCRIPTIONS",
    "PLOT_FILES",
    "ROUTER_DESCRIPTIONS",
    "ROUTER_TAGS",
    "ROUTER_TITLES",
    "MetricsTable",
    "as_dict",
    "as_float",
    "as_list",
    "dataset_summary",
    "domain_rows",
    "eval_summary",
    "format_parameter_count",
    "format_value",
    "hyperparameters",
    "last_eval_metrics",
    "looks_like_repo_id",
    "parameter_count",
    "recorded_training_args",
    "routing_metrics_table",
    "training_results",
]

#: Plot files the Trainer writes (its plot callback, trainers/plots.py, and the co-activation heatmap of
#: each evaluation), as (alt text, file name).
PLOT_FILES = (
    ("Expert load per layer at evaluation", "routing_load_heatmap_eval.png"),
    ("Expert load per layer during training", "routing_load_heatmap.png"),
    ("Routing metrics over training", "routing_curves.png"),
    ("Routing metrics at evaluations", "routing_curves_eval.png"),
    ("Expert co-activation P(b | a) at evaluation", "routing_coactivation_eval.png"),
)

ROUTER_TITLES = {
    "linear": "linear (the family's own gate)",
    "sr_moe": "SR-MoE (spectral-norm and stable-rank control)",
    "l2r": "L2R (low-rank, Lipschitz-controlled routing)",
    "cosine": "cosine (X-MoE)",
}
ROUTER_TAGS = {"linear": "linear-router", "sr_moe": "sr-moe", "l2r": "l2r", "cosine": "cosine-router"}
ROUTER_DESCRIPTIONS = {
    "linear": "The family's own linear gate, bit-identical to the original router; the baseline.",
    "sr_moe": (
        "SR-MoE (arXiv 2601.03889): the spectral norm of the routing matrix, which bounds the router's "
        "Lipschitz constant, is penalised or constrained, and its stable rank is kept high so expert "
        "selection uses many feature directions; scoring is linear or by prototypes."
    ),
    "l2r": (
        "L2R (arXiv 2601.21349): tokens are projected into a shared low-rank latent space and each "
        "expert is scored by Saturated Inner-Product Scoring against several anchors."
    ),
    "cosine": (
        "X-MoE cosine routing (Chi et al., 2022): tokens are projected to a small dimension and scored "
        "by their cosine with expert embeddings, divided by a learned temperature."
    ),
}
CITATIONS = {
    "sr_moe": """@misc{delibasoglu2026srmoe,
  title         = {Spectral Manifold Regularization for Stable and Modular Routing in Deep MoE Architectures},
  author        = {Delibasoglu, I.},
  year          = {2026},
  eprint        = {2601.03889},
  archivePrefix = {arXiv},
}""",
    "l2r": """@misc{yang2026l2r,
  title         = {L2R: Low-Rank and Lipschitz-Controlled Routing for Mixture-of-Experts},
  author        = {Yang, M. and Togo, R. and Li, G. and Ogawa, T. and Haseyama, M.},
  year          = {2026},
  eprint        = {2601.21349},
  archivePrefix = {arXiv},
}""",
    "cosine": """@inproceedings{chi2022xmoe,
  title         = {On the Representation Collapse of Sparse Mixture of Experts},
  author        = {Chi, Zewen and others},
  booktitle     = {Advances in Neural Information Processing Systems},
  year          = {2022},
  eprint        = {2204.09179},
  archivePrefix = {arXiv},
}""",
}
HYPERPARAMETER_FIELDS = (
    "learning_rate",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "bf16",
    "fp16",
    "seed",
)
# MoERouterTrainingArguments fields that change what is logged, not what is trained.
_ROUTER_LOGGING_FIELDS = frozenset(
    {
        "router_flip_epsilon",
        "router_costly_metrics_interval",
        "router_metrics_max_tokens",
        "router_log_per_layer",
        "router_plots",
    }
)
_MAX_LOG_ROWS = 20


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def as_float(value: Any) -> float | None:
    """A float from a metric value; JSON files store inf/NaN as strings (``"inf"``)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def format_value(value: Any) -> str:
    """A metric or hyper-parameter for a Markdown table: 4 significant digits, ``∞``, ``–`` for none."""
    value_f = as_float(value)
    if value_f is None:
        return "–" if value is None else str(value)
    if math.isnan(value_f):
        return "–"
    if math.isinf(value_f):
        return "∞" if value_f > 0 else "−∞"
    if isinstance(value, int) or value_f.is_integer() and abs(value_f) < 1e6:
        return str(int(value_f))
    return f"{value_f:.4g}"


def looks_like_repo_id(name: str) -> bool:
    """Whether ``name`` can be a Hub repo id (and is not a local path): only those go in the YAML."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name)) and not os.path.exists(name)


def as_dict(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"Expected a dict or a dataclass; got {type(obj).__name__}.")


def as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [v for v in value if v]


# --------------------------------------------------------------------------------------------
# Routing metrics
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MetricsTable:
    """The routing-metric table of a card: one row per metric, mean then one column per layer."""

    source: str
    layers: list[str]
    rows: list[dict[str, Any]]  # {"name", "mean", "cells"}: formatted strings
    legend: list[tuple[str, str]]


def _metric_order(names: Iterable[str]) -> list[str]:
    # METRIC_DESCRIPTIONS is the canonical metric list (metrics/catalog.py), in table order.
    known = [n for n in METRIC_DESCRIPTIONS if n in names]
    return known + sorted(set(names) - set(known))


def _table(
    source: str, layers: list[str], means: dict[str, Any], per_layer: dict[str, dict[str, Any]]
) -> MetricsTable:
    rows = []
    for name in _metric_order(set(means) | set(per_layer)):
        values = per_layer.get(name, {})
        mean = means.get(name)
        if mean is None and values:
            finite = [v for v in map(as_float, values.values()) if v is not None and not math.isnan(v)]
            mean = sum(finite) / len(finite) if finite else None
        rows.append(
            {
                "name": name,
                "mean": format_value(mean),
                "cells": [format_value(values.get(layer)) for layer in layers],
            }
        )
    legend = [
        (row["name"], METRIC_DESCRIPTIONS[row["name"]]) for row in rows if row["name"] in METRIC_DESCRIPTIONS
    ]
    return MetricsTable(source, layers, rows, legend)


def routing_metrics_table(
    metrics: Mapping[str, Any] | None = None, history: RoutingHistory | Mapping[str, Any] | None = None
) -> MetricsTable | None:
    """The routing-metric table from a metrics dict or a routing history, or None if neither has one.

    ``metrics`` is what ``MoERouterTrainer.evaluate()`` returns (or ``routing_metrics.json``):
    ``eval_router/<metric>`` (mean over layers) and ``eval_router/<metric>/<layer>`` keys; a dict
    with only training keys (``router/...``) gives the last training window instead. ``history``
    (a ``RoutingHistory`` or its dict) gives its last evaluation record, else its last record.
    ``metrics`` wins when both have one.
    """
    for prefix, source in (
        ("eval_router/", "At the last evaluation"),
        ("router/", "Over the last training window"),
    ):
        keys = [k for k in (metrics or {}) if k.startswith(prefix)]
        if not keys:
            continue
        means: dict[str, Any] = {}
        per_layer: dict[str, dict[str, Any]] = {}
        layers: list[str] = []
        for key in keys:
            name, _, layer = key[len(prefix) :].partition("/")
            if layer:
                per_layer.setdefault(name, {})[layer] = metrics[key]  # type: ignore[index]
                if layer not in layers:
                    layers.append(layer)
            else:
                means[name] = metrics[key]  # type: ignore[index]
        return _table(f"{source} (mean over layers, then per layer):", layers, means, per_layer)
    if history is not None:
        if not isinstance(history, RoutingHistory):
            history = RoutingHistory.from_dict(dict(history))
        if history.records:
            evals = history.split("eval")
            record = evals[-1] if evals else history.records[-1]
            where = "evaluation" if record.split == "eval" else f"{record.split} window"
            per_layer = {name: dict(zip(record.layers, values)) for name, values in record.metrics.items()}
            return _table(
                f"At the last {where} (step {record.step}; mean over layers, then per layer):",
                list(record.layers),
                {},
                per_layer,
            )
    return None


#: Prefix of the per-domain keys ``hf-moe-routers inspect --output_metrics`` writes:
#: ``eval_router_domains/<domain>/<metric>`` (mean over layers).
DOMAIN_PREFIX = "eval_router_domains/"
DOMAIN_METRICS = ("domain_tv", "domain_kl")


def domain_rows(metrics: Mapping[str, Any] | None) -> list[dict[str, str]]:
    """The per-domain specialisation rows of a card, ``{"domain", "domain_tv", "domain_kl"}``
    formatted, in the order the metrics dict lists the domains (empty when it has none)."""
    rows: dict[str, dict[str, str]] = {}
    for key, value in (metrics or {}).items():
        if not key.startswith(DOMAIN_PREFIX):
            continue
        domain, _, name = key[len(DOMAIN_PREFIX) :].rpartition("/")
        if domain and name in DOMAIN_METRICS:
            row = rows.setdefault(domain, {"domain": domain, **{n: "–" for n in DOMAIN_METRICS}})
            row[name] = format_value(value)
    return list(rows.values())


def eval_summary(metrics: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    metrics = metrics or {}
    summary = []
    loss = as_float(metrics.get("eval_loss"))
    if loss is not None:
        summary.append(("validation loss", f"{loss:.4f}"))
        perplexity = as_float(metrics.get("eval_perplexity"))
        if perplexity is None:
            perplexity = math.exp(min(loss, 50.0))
        summary.append(("validation perplexity", f"{perplexity:.2f}"))
    return summary


# --------------------------------------------------------------------------------------------
# Training information
# --------------------------------------------------------------------------------------------


def recorded_training_args(training_args: Any) -> dict[str, Any]:
    """What a card needs of ``TrainingArguments``, as a JSON-safe dict for ``run_info.json``.

    Only the hyper-parameter fields, the ``router_*`` ones and ``world_size`` (a property, not a
    field, so ``to_dict()`` drops it and the total batch size would come out wrong later): the full
    dict holds paths and hub settings that have no place in a published card.
    """
    args = as_dict(training_args)
    kept = {
        name: value
        for name, value in args.items()
        if (name in HYPERPARAMETER_FIELDS or name.startswith("router_"))
        and (value is None or isinstance(value, (bool, int, float, str)))
    }
    world_size = args.get("world_size", getattr(training_args, "world_size", None))
    if world_size is not None:
        kept["world_size"] = int(world_size)
    return kept


def hyperparameters(
    training_args: Any, trainer_state: Mapping[str, Any], run_parameters: Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """The hyper-parameter rows of a card.

    Args:
        training_args: ``TrainingArguments`` or a dict of them (``recorded_training_args``).
        trainer_state: ``TrainerState``'s dict: ``global_step`` becomes ``trained_steps``.
        run_parameters: other settings of the run that wrote the folder (``hf-moe-routers patch``'s
            calibration and distillation), shown as they are, after the training arguments.
    """
    args = as_dict(training_args)
    rows: list[tuple[str, str]] = []
    for name in HYPERPARAMETER_FIELDS:
        value = args.get(name)
        if value is None or (name in ("bf16", "fp16") and not value):
            continue
        if name == "max_steps" and int(value) <= 0:
            continue  # -1: the epochs decide
        if name == "num_train_epochs" and int(args.get("max_steps") or -1) > 0:
            continue  # max_steps overrides the epochs
        rows.append((name, format_value(value) if not isinstance(value, str) else value))
    if args:
        world_size = args.get("world_size") or getattr(training_args, "world_size", 1)
        per_device = args.get("per_device_train_batch_size")
        accumulation = args.get("gradient_accumulation_steps") or 1
        if per_device:
            rows.append(
                ("total_train_batch_size", str(int(per_device) * int(accumulation) * int(world_size)))
            )
    # MoERouterTrainingArguments' loss knobs; None means "the model config's coefficient", left out.
    rows += [
        (name, value if isinstance(value, str) else format_value(value))
        for name, value in sorted(args.items())
        if name.startswith("router_") and name not in _ROUTER_LOGGING_FIELDS and value is not None
    ]
    if trainer_state.get("global_step"):
        rows.append(("trained_steps", str(trainer_state["global_step"])))
    rows += [
        (name, value if isinstance(value, str) else format_value(value))
        for name, value in (run_parameters or {}).items()
        if value is not None
    ]
    return rows


def parameter_count(model: Any) -> int | None:
    """The model's parameter count, each shared (tied) tensor once, as ``model.parameters()`` yields
    them; None for a config."""
    if model is None or not hasattr(model, "parameters"):
        return None
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def format_parameter_count(count: int) -> str:
    """``44,196`` or ``12,345,678 (12.35M)``: the exact count, readable, with millions when large."""
    return f"{count:,}" + (f" ({count / 1e6:.2f}M)" if count >= 1e5 else "")


def _blocks(dataset: Any) -> str | None:
    """``64 blocks of 32 tokens (2,048 tokens)`` for a block dataset, ``64 examples`` otherwise."""
    try:
        count = len(dataset)
    except TypeError:  # an IterableDataset: no length to report
        return None
    block_size = getattr(dataset, "block_size", None)
    if isinstance(block_size, int):
        return f"{count:,} blocks of {block_size} tokens ({count * block_size:,} tokens)"
    return f"{count:,} examples"


def dataset_summary(train_dataset: Any, eval_dataset: Any) -> str | None:
    """How much data a Trainer run had: training and validation blocks (or examples) and tokens."""
    parts = []
    if train_dataset is not None and (train := _blocks(train_dataset)):
        parts.append(f"training: {train}")
    if eval_dataset is not None and (held_out := _blocks(eval_dataset)):
        parts.append(f"validation: {held_out}")
    return "; ".join(parts) + "." if parts else None


def training_results(trainer_state: Mapping[str, Any]) -> list[dict[str, str]]:
    rows: dict[int, dict[str, Any]] = {}
    for entry in trainer_state.get("log_history", []) or []:
        step = entry.get("step")
        if step is None or ("loss" not in entry and "eval_loss" not in entry):
            continue
        row = rows.setdefault(int(step), {"step": str(step), "epoch": format_value(entry.get("epoch"))})
        if "loss" in entry:
            row["train_loss"] = f"{entry['loss']:.4f}"
        if "eval_loss" in entry:
            row["eval_loss"] = f"{entry['eval_loss']:.4f}"
    ordered = [rows[step] for step in sorted(rows)][-_MAX_LOG_ROWS:]
    for row in ordered:
        row.setdefault("train_loss", "–")
        row.setdefault("eval_loss", "–")
    return ordered


def last_eval_metrics(trainer_state: Mapping[str, Any]) -> dict[str, Any]:
    for entry in reversed(trainer_state.get("log_history", []) or []):
        if "eval_loss" in entry or any(k.startswith("eval_router/") for k in entry):
            return dict(entry)
    return {}
