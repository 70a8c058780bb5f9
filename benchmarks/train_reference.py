"""Train the shipped pretrained references: plain OLMoE, Mixtral and Qwen3-MoE causal LMs.

    python benchmarks/train_reference.py --family all --output_dir benchmarks/reference
    python benchmarks/train_reference.py --family mixtral --output_dir benchmarks/reference

Each model is a stock transformers class (``OlmoeForCausalLM``, ``MixtralForCausalLM``,
``Qwen3MoeForCausalLM``) with the family's own linear top-k router, trained from scratch with the
family's own load-balancing loss (``output_router_logits=True``, ``router_aux_loss_coef``) on the
bundled Shakespeare training plays, with the package's byte-level BPE tokenizer (4096 tokens, trained
on the training plays) and its 128-token blocks (``hf_moe_routers.data_utils``: ``bundled_corpus``,
``train_bpe_tokenizer``, ``build_lm_datasets``) — the data of the main job. Nothing is downloaded.

Every family has the same sizes (2 layers, hidden 128, 4 heads, 8 experts of width 256, top-2, tied
embeddings); the optimiser is AdamW with a linear warm-up then a cosine decay to a tenth of the peak
learning rate, with a fixed seed, on ``--threads`` torch threads (default 1). The model is saved to
``<output_dir>/<family>/`` in bfloat16 (``save_pretrained``: safetensors, ``"dtype": "bfloat16"`` in
``config.json``) with its tokenizer, so that stock ``AutoModelForCausalLM.from_pretrained(folder)``
and ``AutoTokenizer.from_pretrained(folder)`` load it offline without this package. The saved folder
is then evaluated in a fresh Python process that never imports ``hf_moe_routers``: validation
perplexity on the whole validation split (the two held-out plays), in bfloat16 as loaded and in
float32, and the per-expert load of every layer. The numbers go to ``<family>/README.md``,
``<output_dir>/reference.json`` (merged with the other families already there) and the index
``<output_dir>/README.md``.

Perplexity here is ``exp`` of the mean next-token cross-entropy over every validation block, each
block scored on its own (127 predicted tokens per 128-token block), computed in float32 from the
logits: the Trainer's ``eval_loss`` convention without its per-batch averaging.

Bad flags exit with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FAMILIES = ("olmoe", "mixtral", "qwen3_moe")
MODEL_CLASSES = {
    "olmoe": "OlmoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

#: Architecture, the same for every family (the family keeps its own attention details: OLMoE's
#: q/k norms, Qwen3's per-head q/k norms, grouped-query attention for Mixtral and Qwen3-MoE as in the
#: released models of those families; OLMoE's released models use full multi-head attention).
SIZES: dict[str, int] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 256,
}
KV_HEADS = {"olmoe": 4, "mixtral": 2, "qwen3_moe": 2}
#: Data: the main job's defaults (``hf_moe_routers.scripts.clm``: vocabulary 4096, blocks of 128).
VOCAB_SIZE = 4096
BLOCK_SIZE = 128
#: The main job's validation cap (``DataArguments.max_eval_blocks``): the training curve is measured
#: on these 128 evenly spaced validation blocks, the final numbers on the whole split.
CURVE_EVAL_BLOCKS = 128
#: A small evenly spaced slice of the validation split whose perplexity is recorded too, for checks
#: that cannot afford the whole split.
SLICE_EVAL_BLOCKS = 32
#: Context length written to the config (the main job's value); training only saw 128-token blocks.
MAX_POSITION_EMBEDDINGS = 4096

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 800,
    "batch_size": 16,
    "lr": 6e-3,
    "warmup_steps": 40,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "aux_loss_coef": 0.01,
    "eval_every": 100,
    "threads": 1,
}
ADAM_BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent


class UsageError(Exception):
    """Bad command-line input: reported in one line with exit status 2."""


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/train_reference.py",
        description=(
            "Train small plain-transformers MoE references (OLMoE, Mixtral, Qwen3-MoE) on the bundled "
            "Shakespeare plays and save them in bfloat16 with their tokenizer, README and perplexities."
        ),
    )
    parser.add_argument("--family", required=True, choices=(*FAMILIES, "all"), help="which model(s) to train")
    parser.add_argument(
        "--output_dir",
        required=True,
        help="folder for <family>/ subfolders, reference.json and README.md (e.g. benchmarks/reference)",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimiser steps")
    parser.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="blocks per step")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    parser.add_argument("--warmup_steps", type=int, default=DEFAULTS["warmup_steps"])
    parser.add_argument(
        "--min_lr_ratio",
        type=float,
        default=DEFAULTS["min_lr_ratio"],
        help="final learning rate of the cosine decay, as a fraction of --lr",
    )
    parser.add_argument("--weight_decay", type=float, default=DEFAULTS["weight_decay"])
    parser.add_argument(
        "--aux_loss_coef",
        type=float,
        default=DEFAULTS["aux_loss_coef"],
        help="router_aux_loss_coef of the family's load-balancing loss",
    )
    parser.add_argument(
        "--eval_every", type=int, default=DEFAULTS["eval_every"], help="steps between validation points"
    )
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch CPU threads")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` naming the first flag with a value that cannot work."""
    for name in ("steps", "batch_size", "eval_every", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1; got {getattr(args, name)}.")
    if args.warmup_steps < 0 or args.warmup_steps >= args.steps:
        raise UsageError(
            f"--warmup_steps must be in [0, --steps); got {args.warmup_steps} with --steps {args.steps}."
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number; got {args.lr}.")
    if not (math.isfinite(args.min_lr_ratio) and 0 <= args.min_lr_ratio <= 1):
        raise UsageError(f"--min_lr_ratio must be between 0 and 1; got {args.min_lr_ratio}.")
    for name in ("weight_decay", "aux_loss_coef"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name} must be a non-negative number; got {value}.")
    if args.seed < 0:
        raise UsageError(f"--seed must be non-negative; got {args.seed}.")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output_dir: {args.output_dir!r} exists and is not a folder.")
    for family in FAMILIES:
        if (output / family).exists() and not (output / family).is_dir():
            raise UsageError(f"--output_dir: {str(output / family)!r} exists and is not a folder.")
    try:  # created now, so that an unusable path fails before minutes of training
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--output_dir: cannot create {args.output_dir!r}: {error.strerror or error}."
        ) from None
    if not os.access(output, os.W_OK):
        raise UsageError(f"--output_dir: {args.output_dir!r} is not writable.")


def command_for(args: argparse.Namespace, family: str) -> str:
    """The command line that regenerates ``family``: the family, the output folder and every flag
    whose value differs from its default."""
    parts = ["python", "benchmarks/train_reference.py", "--family", family, "--output_dir", args.output_dir]
    for name, default in DEFAULTS.items():
        value = getattr(args, name)
        if value != default:
            parts += [f"--{name}", str(value)]
    return shlex.join(parts)


# --------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------


def load_data() -> dict[str, Any]:
    """The package's bundled corpus, its tokenizer and its token blocks, as the main job builds them."""
    from hf_moe_routers import data_utils

    corpus = data_utils.bundled_corpus()
    manifest = data_utils.bundled_corpus_manifest()
    tokenizer = data_utils.train_bpe_tokenizer(corpus["train"], vocab_size=VOCAB_SIZE)
    train, validation = data_utils.build_lm_datasets(
        corpus["train"], corpus["validation"], tokenizer, BLOCK_SIZE
    )
    # Evenly spaced subsets of the validation blocks, as the main job's max_eval_blocks cap takes them
    # (the cap of the first side; `hf_moe_routers inspect` reads held-out text the same way).
    curve, _ = data_utils.build_lm_datasets(
        corpus["validation"], None, tokenizer, BLOCK_SIZE, max_train_blocks=CURVE_EVAL_BLOCKS
    )
    slice_, _ = data_utils.build_lm_datasets(
        corpus["validation"], None, tokenizer, BLOCK_SIZE, max_train_blocks=SLICE_EVAL_BLOCKS
    )
    return {
        "tokenizer": tokenizer,
        "train": train.blocks,
        "validation": validation.blocks,
        "curve": curve.blocks,
        "slice": slice_.blocks,
        "train_plays": [entry["title"] for entry in manifest["splits"]["train"]],
        "validation_plays": [entry["title"] for entry in manifest["splits"]["validation"]],
    }


def build_config(family: str, tokenizer: Any, aux_loss_coef: float) -> Any:
    """A plain transformers config of ``family`` with :data:`SIZES` and ``tokenizer``'s vocabulary."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=SIZES["hidden_size"],
        num_hidden_layers=SIZES["num_hidden_layers"],
        num_attention_heads=SIZES["num_attention_heads"],
        num_key_value_heads=KV_HEADS[family],
        num_experts_per_tok=SIZES["num_experts_per_tok"],
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=aux_loss_coef,
    )
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    width = SIZES["expert_intermediate_size"]
    if family == "olmoe":
        # norm_topk_prob=False: the OLMoE default, as in the released OLMoE models.
        return transformers.OlmoeConfig(**common, num_experts=SIZES["num_experts"], intermediate_size=width)
    if family == "mixtral":
        # Mixtral always renormalises its top-k weights.
        return transformers.MixtralConfig(
            **common, num_local_experts=SIZES["num_experts"], intermediate_size=width, head_dim=head_dim
        )
    # Qwen3-MoE: every layer sparse, top-k weights renormalised as in the released Qwen3-MoE models;
    # intermediate_size is the dense MLP width, unused when every layer is an MoE layer.
    return transformers.Qwen3MoeConfig(
        **common,
        num_experts=SIZES["num_experts"],
        moe_intermediate_size=width,
        intermediate_size=2 * width,
        head_dim=head_dim,
        norm_topk_prob=True,
    )


def parameter_counts(model: Any) -> dict[str, int]:
    """Total parameters (tied embeddings counted once), those of the experts, and those active per token."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    num_experts, top_k = SIZES["num_experts"], SIZES["num_experts_per_tok"]
    return {
        "total": total,
        "experts": experts,
        "active_per_token": total - experts + experts * top_k // num_experts,
    }


def lr_lambda(args: argparse.Namespace):
    """Linear warm-up over ``warmup_steps``, then a cosine from 1 to ``min_lr_ratio`` at ``steps``."""

    def factor(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, progress))
        )

    return factor


# --------------------------------------------------------------------------------------------------
# Evaluation (stock torch and transformers only: it also runs in a process without hf_moe_routers)
# --------------------------------------------------------------------------------------------------


def evaluate(model: Any, blocks: Any, batch_size: int = 32) -> dict[str, Any]:
    """Perplexity of ``model`` on ``blocks`` ([N, T] token ids, each block scored on its own) and the
    share of top-k assignments each expert of each layer receives on those tokens."""
    import torch
    import torch.nn.functional as F

    config = model.config
    num_experts = getattr(config, "num_experts", None) or config.num_local_experts
    top_k = config.num_experts_per_tok
    nll_sum, count = 0.0, 0
    loads: list[Any] = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size]
            out = model(input_ids=batch, output_router_logits=True, use_cache=False)
            logits = out.logits[:, :-1].float()
            targets = batch[:, 1:]
            nll_sum += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            count += targets.numel()
            for layer, router_logits in enumerate(out.router_logits):
                chosen = router_logits.float().topk(top_k, dim=-1).indices.reshape(-1)
                counts = torch.bincount(chosen, minlength=num_experts).double()
                if layer == len(loads):
                    loads.append(counts)
                else:
                    loads[layer] += counts
    model.train(was_training)
    return {
        "perplexity": math.exp(nll_sum / count),
        "mean_nll": nll_sum / count,
        "scored_tokens": count,
        "expert_load": [[round(float(c), 6) for c in (layer / layer.sum())] for layer in loads],
    }


def stock_check(folder: str, blocks_path: str, output_path: str, threads: int) -> None:
    """Entry point of the fresh evaluation process: load ``folder`` with stock transformers in its saved
    dtype and in float32, evaluate on the saved blocks, and write the results to ``output_path``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    tensors = torch.load(blocks_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__, "tokenizer_len": len(tokenizer)}
    for name, kwargs in (("bf16", {}), ("fp32", {"dtype": torch.float32})):
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        parameter_dtype = next(model.parameters()).dtype
        results[name] = {
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "dtype": str(parameter_dtype).removeprefix("torch."),
            "validation": evaluate(model, tensors["validation"]),
            "slice": evaluate(model, tensors["slice"]),
        }
    prompt = "ROMEO:\n"
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        generated = model.generate(
            ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    results["greedy_sample"] = {"prompt": prompt, "text": tokenizer.decode(generated[0])}
    results["transformers"] = transformers.__version__
    results["hf_moe_routers_imported"] = any(m.split(".")[0] == "hf_moe_routers" for m in sys.modules)
    Path(output_path).write_text(json.dumps(results))


def run_stock_check(folder: Path, data: dict[str, Any], threads: int) -> dict[str, Any]:
    """:func:`stock_check` in a fresh interpreter, which must not have imported hf_moe_routers."""
    import torch

    with tempfile.TemporaryDirectory(prefix="reference_check_") as tmp:
        blocks_path, output_path = Path(tmp, "blocks.pt"), Path(tmp, "results.json")
        torch.save({"validation": data["validation"], "slice": data["slice"]}, blocks_path)
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import train_reference as t; "
            "t.stock_check(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))"
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(SCRIPT.parent),
                str(folder.resolve()),  # the child runs in another folder
                str(blocks_path),
                str(output_path),
                str(threads),
            ],
            check=True,
            env=env,
            cwd=tempfile.gettempdir(),  # not the repository root: hf_moe_routers must not be importable by accident
        )
        results = json.loads(output_path.read_text())
    if results["hf_moe_routers_imported"]:
        raise RuntimeError("the stock evaluation process imported hf_moe_routers")
    return results


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_family(family: str, args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    output = Path(args.output_dir) / family
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(args.seed)
    config = build_config(family, data["tokenizer"], args.aux_loss_coef)
    model_class = getattr(transformers, MODEL_CLASSES[family])
    model = model_class(config)
    if not type(model).__module__.startswith("transformers.models."):
        raise RuntimeError(f"{family}: built {type(model)} instead of a stock transformers class")
    model.train()
    counts = parameter_counts(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm weights
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=ADAM_BETAS,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    train_blocks = data["train"]
    generator = torch.Generator().manual_seed(args.seed)
    batches_per_epoch = train_blocks.shape[0] // args.batch_size

    def batches():
        while True:  # a fresh permutation every epoch; the incomplete last batch is dropped
            order = torch.randperm(train_blocks.shape[0], generator=generator)
            for i in range(batches_per_epoch):
                yield train_blocks[order[i * args.batch_size : (i + 1) * args.batch_size]]

    print(
        f"[{family}] {MODEL_CLASSES[family]}: {counts['total']:,} parameters "
        f"({counts['active_per_token']:,} active per token); {args.steps} steps x {args.batch_size} blocks "
        f"of {BLOCK_SIZE} tokens; {train_blocks.shape[0]} training blocks",
        flush=True,
    )
    curve: list[dict[str, Any]] = []
    window_lm, window_aux, window_steps = 0.0, 0.0, 0
    start = time.perf_counter()
    stream = batches()
    initial = evaluate(model, data["curve"])
    curve.append({"step": 0, "train_loss": None, "aux_loss": None, "val_perplexity": initial["perplexity"]})
    for step in range(1, args.steps + 1):
        batch = next(stream)
        out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        aux = out.aux_loss.item()
        window_lm += out.loss.item() - args.aux_loss_coef * aux
        window_aux += aux
        window_steps += 1
        if step % args.eval_every == 0 or step == args.steps:
            point = evaluate(model, data["curve"])
            curve.append(
                {
                    "step": step,
                    "train_loss": round(window_lm / window_steps, 4),
                    "aux_loss": round(window_aux / window_steps, 4),
                    "val_perplexity": round(point["perplexity"], 3),
                }
            )
            print(
                f"[{family}] step {step}: train loss {window_lm / window_steps:.3f}, aux {window_aux / window_steps:.3f}, "
                f"lr {scheduler.get_last_lr()[0]:.2e}, val ppl ({CURVE_EVAL_BLOCKS} blocks) {point['perplexity']:.2f}, "
                f"{time.perf_counter() - start:.0f} s",
                flush=True,
            )
            window_lm, window_aux, window_steps = 0.0, 0.0, 0
    train_seconds = time.perf_counter() - start
    before_rounding = evaluate(model, data["validation"])

    # Save in bfloat16, for inference: output_router_logits off (with it on, a forward with labels adds
    # the load-balancing term to `loss`); router_aux_loss_coef keeps the value trained with.
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    output.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (output / stale).unlink(missing_ok=True)
    model.save_pretrained(output)
    data["tokenizer"].save_pretrained(output)
    for path in output.iterdir():
        path.chmod(0o644)  # save_pretrained may write the weights owner-only
    saved_config = json.loads((output / "config.json").read_text())
    if saved_config.get("dtype") != "bfloat16":
        raise RuntimeError(f"{family}: config.json records dtype {saved_config.get('dtype')!r}, not bfloat16")

    check = run_stock_check(output, data, args.threads)
    tokens = args.steps * args.batch_size * BLOCK_SIZE
    entry = {
        "family": family,
        "folder": family,
        "model_class": MODEL_CLASSES[family],
        "command": command_for(args, family),
        "architecture": {
            **SIZES,
            "num_key_value_heads": KV_HEADS[family],
            "head_dim": SIZES["hidden_size"] // SIZES["num_attention_heads"],
            "vocab_size": len(data["tokenizer"]),
            "tie_word_embeddings": True,
            "norm_topk_prob": {"olmoe": False, "mixtral": True, "qwen3_moe": True}[family],
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        },
        "parameters": counts,
        "size_bytes": {
            "model.safetensors": (output / "model.safetensors").stat().st_size,
            "folder": sum(
                p.stat().st_size for p in output.iterdir() if p.is_file() and p.name != "README.md"
            ),
        },
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "block_size": BLOCK_SIZE,
            "tokens": tokens,
            "epochs": round(args.steps * args.batch_size / train_blocks.shape[0], 3),
            "optimizer": f"AdamW(betas={ADAM_BETAS}, weight_decay={args.weight_decay} on matrices), grad clip {GRAD_CLIP}",
            "lr": args.lr,
            "schedule": f"linear warm-up {args.warmup_steps} steps, cosine to {args.min_lr_ratio} x lr at step {args.steps}",
            "router_aux_loss_coef": args.aux_loss_coef,
            "threads": args.threads,
            "wall_seconds": round(train_seconds, 1),
            "final_aux_loss": curve[-1]["aux_loss"],
            "curve": curve,
            "curve_eval_blocks": CURVE_EVAL_BLOCKS,
        },
        "validation": {
            "blocks": int(data["validation"].shape[0]),
            "scored_tokens": check["bf16"]["validation"]["scored_tokens"],
            "perplexity_bf16": round(check["bf16"]["validation"]["perplexity"], 4),
            "perplexity_fp32": round(check["fp32"]["validation"]["perplexity"], 4),
            "perplexity_fp32_before_bf16_rounding": round(before_rounding["perplexity"], 4),
            "uniform_perplexity": len(data["tokenizer"]),
        },
        "validation_slice": {
            "blocks": int(data["slice"].shape[0]),
            "how": (
                f"build_lm_datasets(validation_texts, None, tokenizer, {BLOCK_SIZE}, "
                f"max_train_blocks={SLICE_EVAL_BLOCKS}): evenly spaced blocks of the split"
            ),
            "perplexity_bf16": round(check["bf16"]["slice"]["perplexity"], 4),
            "perplexity_fp32": round(check["fp32"]["slice"]["perplexity"], 4),
        },
        "expert_load_fp32": check["fp32"]["validation"]["expert_load"],
        "expert_load_bf16": check["bf16"]["validation"]["expert_load"],
        "loaded_as": {"bf16": check["bf16"]["class"], "fp32": check["fp32"]["class"]},
        "greedy_sample": check["greedy_sample"],
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    if check["bf16"]["dtype"] != "bfloat16" or check["fp32"]["dtype"] != "float32":
        raise RuntimeError(f"{family}: loaded dtypes {check['bf16']['dtype']}, {check['fp32']['dtype']}")
    (output / "README.md").write_text(model_readme(entry, data))
    print(
        f"[{family}] saved to {output}: validation perplexity {entry['validation']['perplexity_bf16']:.3f} (bf16), "
        f"{entry['validation']['perplexity_fp32']:.3f} (fp32); {train_seconds:.0f} s of training",
        flush=True,
    )
    return entry


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def _load_table(loads: list[list[float]]) -> str:
    experts = len(loads[0])
    lines = [
        "| layer | " + " | ".join(f"e{i}" for i in range(experts)) + " | max / min |",
        "|---" * (experts + 2) + "|",
    ]
    for layer, row in enumerate(loads):
        ratio = max(row) / min(row) if min(row) > 0 else math.inf
        lines.append(f"| {layer} | " + " | ".join(f"{100 * v:.1f}" for v in row) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def model_readme(entry: dict[str, Any], data: dict[str, Any]) -> str:
    a, t, v, s = entry["architecture"], entry["training"], entry["validation"], entry["validation_slice"]
    p = entry["parameters"]
    curve = "\n".join(
        f"| {c['step']} | {'' if c['train_loss'] is None else c['train_loss']} | "
        f"{'' if c['aux_loss'] is None else c['aux_loss']} | {c['val_perplexity']:.2f} |"
        for c in t["curve"]
    )
    sample = entry["greedy_sample"]["text"]
    return f"""# Reference `{entry["model_class"]}` ({entry["family"]}), trained on the bundled Shakespeare plays

A small plain transformers `{entry["model_class"]}` — the family's own linear top-{a["num_experts_per_tok"]} router,
no class of `hf_moe_routers` — trained from scratch, saved in bfloat16 with its tokenizer. It loads
offline with stock transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("benchmarks/reference/{entry["folder"]}")  # bfloat16, as saved
tokenizer = AutoTokenizer.from_pretrained("benchmarks/reference/{entry["folder"]}")
```

Regenerate it (from the repository root, a few minutes on one CPU thread):

```bash
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 {entry["command"]}
```

## Architecture

| | |
|---|---|
| class | `{entry["model_class"]}` (`{entry["loaded_as"]["bf16"]}`) |
| layers | {a["num_hidden_layers"]}, every one a sparse MoE layer |
| hidden size | {a["hidden_size"]} |
| attention | {a["num_attention_heads"]} query heads, {a["num_key_value_heads"]} key/value heads, head dim {a["head_dim"]} |
| experts | {a["num_experts"]} per layer, top-{a["num_experts_per_tok"]}, expert width {a["expert_intermediate_size"]}, norm_topk_prob={a["norm_topk_prob"]} |
| vocabulary | {a["vocab_size"]} (byte-level BPE of `hf_moe_routers.data_utils.train_bpe_tokenizer`), tied input/output embeddings |
| context | trained on {t["block_size"]}-token blocks (`max_position_embeddings` = {a["max_position_embeddings"]}) |
| parameters | {p["total"]:,} total, {p["experts"]:,} in experts, {p["active_per_token"]:,} active per token |
| size | `model.safetensors` {entry["size_bytes"]["model.safetensors"] / 1e6:.2f} MB (bfloat16) |

## Training

- Data: the package's bundled corpus (`data_utils.bundled_corpus()`), training split ({len(data["train_plays"])} plays),
  tokenized and cut into {t["block_size"]}-token blocks by `data_utils.build_lm_datasets` ({data["train"].shape[0]:,} blocks);
  the tokenizer is `train_bpe_tokenizer(train_texts, vocab_size={a["vocab_size"]})`, as in the main job.
- {t["steps"]} steps x {t["batch_size"]} blocks = {t["tokens"]:,} training tokens ({t["epochs"]} epochs), seed {t["seed"]}, {t["threads"]} torch thread(s).
- {t["optimizer"]}; peak lr {t["lr"]}; {t["schedule"]}.
- Loss: cross-entropy + {t["router_aux_loss_coef"]} x the family's load-balancing loss (`output_router_logits=True`,
  `router_aux_loss_coef={t["router_aux_loss_coef"]}`); the saved config has `output_router_logits=false`, so a forward
  with labels returns the plain cross-entropy.
- Wall time: {t["wall_seconds"]:.0f} s of training (torch {entry["environment"]["torch"]}, transformers {entry["environment"]["transformers"]}).

Validation perplexity during training (float32, on the {t["curve_eval_blocks"]} evenly spaced validation blocks the main job
evaluates on; train and aux losses are means over the steps since the previous row):

| step | train loss | aux loss | val ppl |
|---|---|---|---|
{curve}

## Validation

Whole validation split ({", ".join(data["validation_plays"])}): {v["blocks"]} blocks of {t["block_size"]} tokens,
{v["scored_tokens"]:,} predicted tokens, each block scored on its own; perplexity = exp(mean next-token
cross-entropy), computed in float32 from the logits. Measured on the saved folder, loaded by stock transformers
in a process that does not import `hf_moe_routers`.

| weights | validation perplexity |
|---|---|
| bfloat16, as loaded | {v["perplexity_bf16"]:.3f} |
| float32 (`from_pretrained(folder, dtype=torch.float32)`) | {v["perplexity_fp32"]:.3f} |
| float32 before rounding to bfloat16 (end of training) | {v["perplexity_fp32_before_bf16_rounding"]:.3f} |
| uniform over the vocabulary | {v["uniform_perplexity"]} |

On the {s["blocks"]} evenly spaced validation blocks that a cap of {s["blocks"]} blocks keeps (`build_lm_datasets`):
{s["perplexity_bf16"]:.3f} (bfloat16), {s["perplexity_fp32"]:.3f} (float32).

Per-expert load on the validation tokens (float32 weights): % of the top-{a["num_experts_per_tok"]} assignments of each
layer that go to each expert (uniform = {100 / a["num_experts"]:.1f} %):

{_load_table(entry["expert_load_fp32"])}

Greedy continuation of `ROMEO:` (48 new tokens, bfloat16 weights as loaded):

```text
{sample}
```
"""


def _cv(values: list[float]) -> float:
    """Coefficient of variation (population std / mean)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


def index_readme(reference: dict[str, Any]) -> str:
    rows = []
    for family in FAMILIES:
        e = reference["models"].get(family)
        if e is None:
            continue
        rows.append(
            f"| [{family}]({family}/README.md) | `{e['model_class']}` | {e['parameters']['total'] / 1e6:.2f}M "
            f"({e['parameters']['active_per_token'] / 1e6:.2f}M active) | "
            f"{e['size_bytes']['model.safetensors'] / 1e6:.2f} MB | {e['training']['steps']} x {e['training']['batch_size']} x "
            f"{e['training']['block_size']} = {e['training']['tokens'] / 1e6:.2f}M | "
            f"{e['validation']['perplexity_bf16']:.2f} | {e['validation']['perplexity_fp32']:.2f} | "
            f"{e['training']['wall_seconds']:.0f} s |"
        )
    d = reference["data"]
    routing = []
    for family in FAMILIES:
        e = reference["models"].get(family)
        if e is None:
            continue
        loads = e["expert_load_fp32"]
        per_layer = ", ".join(f"{_cv(layer):.2f}" for layer in loads)
        pooled = _cv([sum(column) / len(loads) for column in zip(*loads)])
        smallest = min(min(layer) for layer in loads)
        routing.append(
            f"| {family} | {per_layer} | {pooled:.2f} | {100 * smallest:.1f} % | {e['training']['final_aux_loss']} |"
        )
    return f"""# Pretrained reference models

Small plain transformers MoE causal LMs — the families' own linear routers, no class of
`hf_moe_routers` — trained from scratch on the package's bundled Shakespeare plays, shipped in
bfloat16 with their tokenizers. Each folder loads offline with stock
`AutoModelForCausalLM.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`; they
are references to patch, distil and fine-tune routers against. `reference.json` holds every number
below (and the training curves and per-expert loads); `tests/test_reference_models.py` checks that
the folders still load and reproduce the recorded perplexities.

Regenerate all three (one after another, a few minutes each on one CPU thread):

```bash
HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/train_reference.py --family all --output_dir benchmarks/reference
```

| model | class | parameters | model.safetensors | training tokens (steps x blocks x length) | val ppl (bf16) | val ppl (fp32) | training time |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Validation perplexity: exp of the mean next-token cross-entropy over the whole validation split
({", ".join(d["validation_plays"])}; {d["validation_blocks"]} blocks of {d["block_size"]} tokens from
`data_utils.build_lm_datasets`, each block scored on its own), computed in float32 from the logits of
the model loaded in bfloat16 as saved, or in float32. A uniform guess scores {d["vocab_size"]}.
Tokenizer: `data_utils.train_bpe_tokenizer(bundled_corpus()["train"], vocab_size={d["vocab_size"]})`,
the main job's. Training is deterministic for a given seed, torch build and thread count; other
machines may differ in the last digits.

## Routing

Per-expert load on the validation tokens (share of each layer's top-k assignments; every folder's
README has the table). The families' load-balancing loss (`load_balancing_loss_func` of
transformers, the one `router_aux_loss_coef` weighs) averages the assignment shares and router
probabilities over all layers before taking their product, so it balances the load summed over the
layers, not each layer: an expert starved in one layer and crowded in the other costs it nothing.
The coefficient of variation (std / mean) of the expert loads shows it:

| model | CV per layer | CV of the layer-averaged load | smallest expert share | final aux loss (2.0 at uniform routing) |
|---|---|---|---|---|
{chr(10).join(routing)}
"""


def write_reference(output_dir: Path, entries: list[dict[str, Any]], data: dict[str, Any]) -> None:
    path = output_dir / "reference.json"
    reference: dict[str, Any] = {"models": {}}
    if path.is_file():
        try:
            reference = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} is not valid JSON; rewriting it", file=sys.stderr)
    reference.setdefault("models", {})
    reference["format"] = 1
    reference["data"] = {
        "corpus": "hf_moe_routers.data_utils.bundled_corpus()",
        "train_plays": data["train_plays"],
        "validation_plays": data["validation_plays"],
        "tokenizer": f"data_utils.train_bpe_tokenizer(corpus['train'], vocab_size={VOCAB_SIZE})",
        "vocab_size": len(data["tokenizer"]),
        "block_size": BLOCK_SIZE,
        "train_blocks": int(data["train"].shape[0]),
        "validation_blocks": int(data["validation"].shape[0]),
        "validation_slice_blocks": int(data["slice"].shape[0]),
        "perplexity": "exp(mean next-token cross-entropy), every block scored on its own, float32 logits",
    }
    for entry in entries:
        reference["models"][entry["family"]] = entry
    reference["models"] = {f: reference["models"][f] for f in FAMILIES if f in reference["models"]}
    path.write_text(json.dumps(reference, indent=2) + "\n")
    (output_dir / "README.md").write_text(index_readme(reference))


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with status 2 on unknown flags or choices
    try:
        check_args(args)
    except UsageError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    # Explicit thread count, set before torch is imported (OpenMP reads OMP_NUM_THREADS when it loads).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    families = FAMILIES if args.family == "all" else (args.family,)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data = load_data()
    print(
        f"data: {data['train'].shape[0]} training and {data['validation'].shape[0]} validation blocks of "
        f"{BLOCK_SIZE} tokens, vocabulary {len(data['tokenizer'])}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    entries = []
    for family in families:
        entries.append(train_family(family, args, data))
        write_reference(output_dir, entries, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
