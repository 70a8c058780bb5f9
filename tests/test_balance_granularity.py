"""Balance-loss granularity (``router_balance_granularity``): micro-batch, sequence, global batch.

Hand computations: DeepSeek-V3's sequence-wise loss on a padded 2-sequence batch; the global-batch
loss of two simulated processes against one process on the concatenated batch (value and gradient);
the global-batch loss of each micro-batch under gradient accumulation 2 against the counts
accumulated so far in the optimizer step. The two-process run under accelerate (gloo) is in
tests/test_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import RandomTokens, tiny_model

import hf_moe_routers as H
from hf_moe_routers.reporting.collector import RouterCapture
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments
from hf_moe_routers.trainers import trainer as trainer_module
from hf_moe_routers.trainers.losses import GlobalLoad, balance_loss

LN3 = math.log(3.0)
SCORINGS = ("softmax", "sigmoid", "topk_softmax")


def capture(logits, indices) -> RouterCapture:
    logits = torch.as_tensor(logits, dtype=torch.float32)
    return RouterCapture(logits, torch.as_tensor(indices, dtype=torch.int64), torch.zeros(logits.shape[0], 1))


# ------------------------------------------------------------------------------------------------
# sequence
# ------------------------------------------------------------------------------------------------


def two_sequences(swap: bool = False) -> RouterCapture:
    """E = 2, K = 1, two sequences of 2 tokens; the last token is padding (NaN logits).

    Sequence 0: softmax [3/4, 1/4] -> expert 0, [1/4, 3/4] -> expert 1: f = [1/2, 1/2], P = [1/2, 1/2],
    loss 2·(1/4 + 1/4) = 1. Sequence 1 (one real token): [3/4, 1/4] -> expert 0: f = [1, 0],
    P = [3/4, 1/4], loss 2·3/4 = 3/2. ``swap`` exchanges the experts (same per-sequence losses).
    """
    logits = [[LN3, 0.0], [0.0, LN3], [LN3, 0.0], [float("nan"), float("nan")]]
    indices = [[0], [1], [0], [0]]
    if swap:
        logits = [row[::-1] for row in logits]
        indices = [[1 - i[0]] for i in indices]
    return capture(logits, indices)


MASK = torch.tensor([True, True, True, False])


def test_sequence_loss_by_hand_on_a_padded_two_sequence_batch():
    c = two_sequences()
    loss = balance_loss("per_layer", ["decoder"], [c], [MASK], "softmax", granularity="sequence", rows=2)
    assert float(loss) == pytest.approx((1.0 + 1.5) / 2, abs=1e-6)
    # Over the micro-batch instead: f = [2/3, 1/3], P = [1.75/3, 1.25/3] -> 2·(3.5 + 1.25)/9.
    micro = balance_loss("per_layer", ["decoder"], [c], [MASK], "softmax")
    assert float(micro) == pytest.approx(9.5 / 9, abs=1e-6)
    # A sequence of padding only is left out of the mean over sequences.
    padded = capture(
        torch.cat([c.logits_TE, torch.full((2, 2), float("nan"))]),
        torch.cat([c.indices_TK, c.indices_TK[:2]]),
    )
    mask3 = torch.cat([MASK, torch.zeros(2, dtype=torch.bool)])
    loss3 = balance_loss(
        "per_layer", ["decoder"], [padded], [mask3], "softmax", granularity="sequence", rows=3
    )
    assert float(loss3) == pytest.approx(1.25, abs=1e-6)


def test_sequence_loss_layer_granularities_by_hand():
    layers = [two_sequences(), two_sequences(swap=True)]
    masks = [MASK, MASK]
    stacks = ["decoder", "decoder"]
    per_layer = balance_loss("per_layer", stacks, layers, masks, "softmax", granularity="sequence", rows=2)
    assert float(per_layer) == pytest.approx(1.25, abs=1e-6)  # each layer 1.25
    # Pooled per sequence over the two layers: sequence 0 f = P = [1/2, 1/2] -> 1; sequence 1
    # counts [1, 1] of 2 slots, P = [1/2, 1/2] -> 1. The swapped layers hide each other's imbalance.
    pooled = balance_loss("pooled", stacks, layers, masks, "softmax", granularity="sequence", rows=2)
    assert float(pooled) == pytest.approx(1.0, abs=1e-6)


def test_sequence_loss_gradient_ignores_nan_padding():
    logits = two_sequences().logits_TE.clone().requires_grad_(True)
    c = RouterCapture(logits, two_sequences().indices_TK, torch.zeros(4, 1))
    for kind in ("per_layer", "pooled"):
        for scoring in SCORINGS:
            loss = balance_loss(kind, ["decoder"], [c], [MASK], scoring, granularity="sequence", rows=2)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (kind, scoring)
            assert torch.equal(grad[3], torch.zeros(2))  # the padding token gets no gradient


def family_probs(row: list[float], chosen: list[int], scoring: str) -> list[float]:
    """One token's routing probabilities by each family's rule, in plain Python."""
    if scoring == "softmax":
        z = [math.exp(v) for v in row]
        return [v / sum(z) for v in z]
    if scoring == "sigmoid":
        s = [1 / (1 + math.exp(-v)) for v in row]
        return [v / sum(s) for v in s]
    z = {e: math.exp(row[e]) for e in chosen}
    return [z[e] / sum(z.values()) if e in z else 0.0 for e in range(len(row))]


def hand_sequence_loss(logits, indices, mask, rows: int, scoring: str) -> float:
    """Mean over sequences with a real token of E·Σ_e f_be·P_be, token by token."""
    num_tokens, num_experts = len(logits), len(logits[0])
    length = num_tokens // rows
    losses = []
    for b in range(rows):
        real = [t for t in range(b * length, (b + 1) * length) if mask[t]]
        if not real:
            continue
        f = [sum(list(indices[t]).count(e) for t in real) / len(real) for e in range(num_experts)]
        probs = [family_probs(logits[t], list(indices[t]), scoring) for t in real]
        p = [sum(q[e] for q in probs) / len(real) for e in range(num_experts)]
        losses.append(num_experts * sum(f[e] * p[e] for e in range(num_experts)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("scoring", SCORINGS)
def test_sequence_loss_follows_each_family_probability_rule(scoring):
    generator = torch.Generator().manual_seed(0)
    rows, length, num_experts, top_k = 3, 5, 4, 2
    logits = torch.randn(rows * length, num_experts, generator=generator)
    indices = logits.topk(top_k, dim=-1).indices
    mask = torch.ones(rows * length, dtype=torch.bool)
    mask[length - 2 : length] = False  # sequence 0: 3 real tokens
    mask[2 * length + 1 :] = False  # sequence 2: 1 real token
    c = capture(logits, indices)
    loss = balance_loss("per_layer", ["decoder"], [c], [mask], scoring, granularity="sequence", rows=rows)
    expected = hand_sequence_loss(logits.tolist(), indices.tolist(), mask.tolist(), rows, scoring)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_sequence_loss_needs_the_batch_layout():
    c = two_sequences()
    with pytest.raises(ValueError, match="not a multiple of the batch's 3 sequences"):
        balance_loss("per_layer", ["decoder"], [c], [MASK], "softmax", granularity="sequence", rows=3)


# ------------------------------------------------------------------------------------------------
# global batch
# ------------------------------------------------------------------------------------------------


def random_capture(seed: int, tokens: int, num_experts: int = 5, top_k: int = 2, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=generator)
    indices = logits.topk(top_k, dim=-1).indices
    if requires_grad:
        logits.requires_grad_(True)
    return RouterCapture(logits, indices, torch.zeros(tokens, 1))


def counts_and_tokens(c: RouterCapture, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num_experts = c.logits_TE.shape[-1]
    counts = torch.zeros(num_experts, dtype=torch.int64)
    for t in range(c.indices_TK.shape[0]):
        if mask[t]:
            for e in c.indices_TK[t].tolist():
                counts[e] += 1
    return counts, mask.sum()


@pytest.mark.parametrize("kind", ["per_layer", "pooled"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_global_batch_in_one_process_with_one_micro_batch_is_the_micro_batch_loss(kind, scoring):
    layers = [random_capture(1, 12), random_capture(2, 12)]
    mask = torch.arange(12) % 5 != 4
    loads = []
    for c in layers:
        counts, tokens = counts_and_tokens(c, mask)
        loads.append(GlobalLoad(counts, tokens, tokens, 1))
    args = (kind, ["decoder"] * 2, layers, [mask, mask], scoring)
    expected = balance_loss(*args)
    assert float(balance_loss(*args, granularity="global_batch", loads=loads)) == pytest.approx(
        float(expected), rel=1e-6
    )


@pytest.mark.parametrize("kind", ["per_layer", "pooled"])
@pytest.mark.parametrize("scoring", SCORINGS)
def test_global_batch_of_two_processes_is_one_process_on_the_concatenated_batch(kind, scoring):
    """Two ranks with unequal padding, each its own P weighted by its share of the joint tokens:
    the mean over ranks (the data-parallel gradient average) is the one-process loss over the
    concatenation, in value and in gradient."""
    sizes, masks = (8, 6), (torch.arange(8) < 7, torch.arange(6) < 2)  # 7 and 2 real tokens
    ranks = [
        [random_capture(10 * r + layer, sizes[r], requires_grad=True) for layer in range(2)] for r in range(2)
    ]
    # One process on the concatenated batch: the same logits tensors, concatenated.
    joined = [
        RouterCapture(
            torch.cat([ranks[0][layer].logits_TE, ranks[1][layer].logits_TE]),
            torch.cat([ranks[0][layer].indices_TK, ranks[1][layer].indices_TK]),
            torch.zeros(sum(sizes), 1),
        )
        for layer in range(2)
    ]
    joined_mask = torch.cat(masks)
    one = balance_loss(kind, ["decoder"] * 2, joined, [joined_mask] * 2, scoring)
    loads_L = []
    for layer in range(2):
        counts_tokens = [counts_and_tokens(ranks[r][layer], masks[r]) for r in range(2)]
        counts = counts_tokens[0][0] + counts_tokens[1][0]
        tokens = counts_tokens[0][1] + counts_tokens[1][1]
        loads_L.append(GlobalLoad(counts, tokens, tokens, 2))
    per_rank = [
        balance_loss(
            kind,
            ["decoder"] * 2,
            ranks[r],
            [masks[r]] * 2,
            scoring,
            granularity="global_batch",
            loads=loads_L,
        )
        for r in range(2)
    ]
    mean = (per_rank[0] + per_rank[1]) / 2
    assert float(mean.detach()) == pytest.approx(float(one.detach()), rel=1e-6)
    leaves = [c.logits_TE for rank in ranks for c in rank]
    grads_two = torch.autograd.grad(mean, leaves)
    grads_one = torch.autograd.grad(one, leaves)
    for g2, g1 in zip(grads_two, grads_one):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-7)
    # Unweighted per-rank micro-batch losses are not the joint loss (the ranks' padding differs).
    micro = [balance_loss(kind, ["decoder"] * 2, ranks[r], [masks[r]] * 2, scoring) for r in range(2)]
    assert abs(float((micro[0] + micro[1]).detach()) / 2 - float(one.detach())) > 1e-3


def make_args(tmp_path, **overrides) -> MoERouterTrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        router_costly_metrics_interval=1000,
        train_sampling_strategy="sequential",
        seed=0,
    )
    kwargs.update(overrides)
    return MoERouterTrainingArguments(**kwargs)


def test_global_batch_under_gradient_accumulation_uses_the_step_counts_so_far(tmp_path, monkeypatch):
    """GA 2, 2 steps: micro-batch 1 of a step takes f from its own counts, micro-batch 2 from the
    sum of both; the next step starts over. P is each micro-batch's own."""
    calls = []
    original = trainer_module.balance_loss

    def recording(kind, stacks, captures, masks, scoring, **kwargs):
        value = original(kind, stacks, captures, masks, scoring, **kwargs)
        detached = [(c.logits_TE.detach().clone(), c.indices_TK.clone()) for c in captures]
        loads = [
            (load.counts_E.clone(), load.tokens.clone(), load.batch_tokens.clone())
            for load in kwargs["loads"]
        ]
        calls.append(
            (detached, [None if m is None else m.clone() for m in masks], loads, float(value.detach()))
        )
        return value

    monkeypatch.setattr(trainer_module, "balance_loss", recording)
    model = H.patch_moe_routers(tiny_model("mixtral"), H.LinearRouterConfig())
    args = make_args(tmp_path, gradient_accumulation_steps=2, router_balance_granularity="global_batch")
    MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(8, pad_every=3)).train()
    assert len(calls) == 4
    assert [bool(masks[0].all()) for _, masks, _, _ in calls] == [False, False, True, False]  # padding
    num_experts = 6
    running = None
    for m, (layers, masks, loads, value) in enumerate(calls):
        hand = []
        for (logits, indices), mask in zip(layers, masks):
            mask = torch.ones(logits.shape[0], dtype=torch.bool) if mask is None else mask
            counts = torch.zeros(num_experts, dtype=torch.int64)
            for t in range(logits.shape[0]):
                if mask[t]:
                    for e in indices[t].tolist():
                        counts[e] += 1
            hand.append((counts, mask.sum()))
        if m % 2 == 0:  # first micro-batch of a step: the sums start over
            running = [(c.clone(), n.clone()) for c, n in hand]
        else:
            running = [(rc + c, rn + n) for (rc, rn), (c, n) in zip(running, hand)]
        expected = []
        for layer, ((logits, _), mask) in enumerate(zip(layers, masks)):
            counts, tokens = running[layer]
            assert torch.equal(loads[layer][0], counts), (m, layer)
            assert int(loads[layer][1]) == int(tokens) and int(loads[layer][2]) == int(hand[layer][1])
            real = [t for t in range(logits.shape[0]) if mask is None or mask[t]]
            probs = [family_probs(logits[t].tolist(), [], "softmax") for t in real]
            p = [sum(q[e] for q in probs) / len(real) for e in range(num_experts)]
            f = [int(counts[e]) / int(tokens) for e in range(num_experts)]
            expected.append(num_experts * sum(f[e] * p[e] for e in range(num_experts)))
        assert value == pytest.approx(sum(expected) / len(expected), rel=1e-5), m


@pytest.mark.parametrize(
    ("family", "kind", "granularity"),
    [
        ("olmoe", "per_layer", "sequence"),
        ("deepseek_v3", "pooled", "sequence"),
        ("gpt_oss", "per_layer", "global_batch"),
        ("switch_transformers", "pooled", "global_batch"),
    ],
)
def test_every_granularity_trains(tmp_path, family, kind, granularity):
    encoder_decoder = family == "switch_transformers"
    model = H.patch_moe_routers(tiny_model(family), H.SRMoEConfig())
    args = make_args(
        tmp_path,
        router_balance_loss=kind,
        router_balance_granularity=granularity,
        gradient_accumulation_steps=2,
        router_balance_loss_weight=0.1,
    )
    trainer = MoERouterTrainer(
        model=model, args=args, train_dataset=RandomTokens(8, pad_every=2, encoder_decoder=encoder_decoder)
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["loss"]) for h in logs)


def test_bad_granularity_names_the_field(tmp_path):
    with pytest.raises(
        ValueError,
        match="router_balance_granularity must be one of 'micro_batch', 'sequence', 'global_batch'",
    ):
        make_args(tmp_path, router_balance_granularity="batch")
    with pytest.raises(ValueError, match="needs router_balance_loss 'per_layer' or 'pooled'"):
        make_args(tmp_path, router_balance_granularity="sequence", router_balance_loss="model")
