"""MoERouterTrainer logs the specialisation metrics, each equal to the pure metric functions applied
to the routing of the same evaluation batches, recomputed here from a separate forward pass.

Covers co-activation, vocabulary specialisation and token-expert mutual information (every window),
domain specialisation (batches with ``domain_ids``), and router saturation against the first
evaluation and against a saved checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

import hf_moe_routers as H
from hf_moe_routers import metrics as M
from hf_moe_routers.reporting.collector import RouterCollector
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

SEQ, BATCH, ROWS = 12, 2, 6
DOMAINS = ("comedy", "tragedy", "history")


class DomainTokens(torch.utils.data.Dataset):
    """Token rows over a small vocabulary (ids repeat, so vocabulary specialisation has support),
    the last row of each pair half padding, each row tagged with a domain."""

    def __init__(self, rows: int = ROWS, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 9, (rows, SEQ), generator=generator)
        self.mask = torch.ones(rows, SEQ, dtype=torch.long)
        self.mask[1::2, SEQ // 2 :] = 0
        self.domains = torch.arange(rows) % len(DOMAINS)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": labels,
            "domain_ids": self.domains[i],
        }


def routed_model():
    return H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=4, num_anchors=2))


def make_trainer(model, tmp_path, **overrides) -> MoERouterTrainer:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        router_plots=False,
        router_costly_metrics_interval=1000,
        router_domain_names=list(DOMAINS),
        seed=0,
    )
    kwargs.update(overrides)
    data = DomainTokens()
    return MoERouterTrainer(
        model=model, args=MoERouterTrainingArguments(**kwargs), train_dataset=data, eval_dataset=data
    )


@torch.no_grad()
def eval_routing(model, dataset=None):
    """Per router, the concatenated top-k ``[T, K]``, with ids, masks and domains ``[T]``."""
    dataset = dataset or DomainTokens()
    collector = RouterCollector(model)
    model.eval()
    indices = [[] for _ in collector.routers]
    for start in range(0, len(dataset), BATCH):
        rows = [dataset[i] for i in range(start, min(start + BATCH, len(dataset)))]
        batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}
        collector.start()
        model(**batch)
        for layer, capture in enumerate(collector.stop()):
            indices[layer].append(capture.indices_TK)
    collector.remove()
    ids = dataset.ids.reshape(-1)
    mask = dataset.mask.reshape(-1).bool()
    domains = dataset.domains.repeat_interleave(SEQ)
    return [torch.cat(i) for i in indices], ids, mask, domains


def test_eval_logs_equal_the_metric_functions_on_the_same_routing(tmp_path):
    model = routed_model()
    trainer = make_trainer(model, tmp_path)
    logs = trainer.evaluate()
    indices, ids, mask, domains = eval_routing(model)
    experts = trainer.routers[0].num_experts
    for info, idx_TK in zip(trainer.routers, indices):
        k = idx_TK.shape[1]
        counts = M.token_expert_counts(ids, idx_TK, experts, mask)
        expected = {
            "vocab_specialisation": M.vocabulary_specialisation(counts.counts_VE, top_k=k),
            "token_expert_mi": M.mutual_information(counts.counts_VE, unit="bits", miller_madow=True),
            "coactivation_top_partner": M.coactivation_top_partner(
                M.coactivation(M.coactivation_counts(idx_TK, experts, mask))
            ),
        }
        by_domain = M.domain_specialisation(
            M.domain_expert_counts(idx_TK, domains, len(DOMAINS), experts, mask)
        )
        expected["domain_tv"] = by_domain.tv
        expected["domain_kl"] = by_domain.kl
        for name, value in expected.items():
            got = logs[f"eval_router/{name}/{info.layer}"]
            assert math.isclose(got, float(value), rel_tol=1e-6, abs_tol=1e-9), (name, info.layer, got, value)
    # No reference configured: no saturation.
    assert not any("router_saturation" in key for key in logs)


def test_domain_ids_survive_column_removal_and_never_reach_the_model(tmp_path):
    model = routed_model()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    trainer = make_trainer(model, tmp_path)
    trainer.train()
    assert seen and all("domain_ids" not in keys for keys in seen)
    logged = [entry for entry in trainer.state.log_history if "router/domain_tv" in entry]
    assert logged, "the training window has domain ids, so it logs domain_tv"


def test_saturation_against_the_first_evaluation(tmp_path):
    model = routed_model()
    trainer = make_trainer(model, tmp_path, router_saturation_reference="first")
    first = trainer.evaluate()
    assert "eval_router/router_saturation" not in first  # the reference itself
    reference, _, mask, _ = eval_routing(model)
    assert trainer.evaluate()["eval_router/router_saturation"] == 1.0  # the same routing
    with torch.no_grad():  # change the routing of every router
        for _, router in model.routed_routers():
            router.scorer.query_proj.mul_(-1.0)
    logs = trainer.evaluate()
    current, _, _, _ = eval_routing(model)
    for info, ref, now in zip(trainer.routers, reference, current):
        expected = float(M.router_saturation(now, ref, mask))
        assert expected < 1.0
        assert math.isclose(logs[f"eval_router/router_saturation/{info.layer}"], expected, rel_tol=1e-6)


def test_saturation_against_a_saved_checkpoint(tmp_path):
    reference_model = routed_model()
    reference_model.save_pretrained(tmp_path / "reference")
    reference, _, mask, _ = eval_routing(reference_model)
    model = routed_model()
    with torch.no_grad():
        for _, router in model.routed_routers():
            router.scorer.query_proj.mul_(-1.0)
    trainer = make_trainer(model, tmp_path / "run", router_saturation_reference=str(tmp_path / "reference"))
    logs = trainer.evaluate()
    current, _, _, _ = eval_routing(model)
    for info, ref, now in zip(trainer.routers, reference, current):
        expected = float(M.router_saturation(now, ref, mask))
        assert math.isclose(logs[f"eval_router/router_saturation/{info.layer}"], expected, rel_tol=1e-6)


def test_a_reference_with_other_routers_is_refused(tmp_path):
    tiny_model("mixtral", num_local_experts=4).save_pretrained(tmp_path / "other")
    trainer = make_trainer(
        routed_model(), tmp_path / "run", router_saturation_reference=str(tmp_path / "other")
    )
    with pytest.raises(ValueError, match=r"router_saturation_reference .* \(experts, top-k\)"):
        trainer.evaluate()


def test_specialisation_can_be_switched_off(tmp_path):
    trainer = make_trainer(routed_model(), tmp_path, router_specialisation=False)
    logs = trainer.evaluate()
    assert "eval_router/load_entropy" in logs
    assert not any(name in key for key in logs for name in M.catalog.SPECIALISATION_METRICS)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"router_domain_names": []}, "router_domain_names"),
        ({"router_domain_key": ""}, "router_domain_key"),
        ({"router_saturation_reference": ""}, "router_saturation_reference"),
    ],
)
def test_bad_specialisation_arguments_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        MoERouterTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **overrides)


def test_domain_ids_without_domain_names_are_refused(tmp_path):
    trainer = make_trainer(routed_model(), tmp_path, router_domain_names=None)
    with pytest.raises(ValueError, match="router_domain_names"):
        trainer.evaluate()


def test_trainer_and_inspect_report_the_same_numbers(tmp_path):
    """One catalog, one computation: on the same single batch, the Trainer's evaluation logs and
    ``inspect``'s metrics agree for every load, batch and specialisation metric both report."""
    from hf_moe_routers.cli.commands import _Specialisation, inspect_metrics
    from hf_moe_routers.metrics.catalog import ROUTING_METRICS
    from hf_moe_routers.reporting import specialisation_report

    model = routed_model()
    data = DomainTokens()
    full = {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids)}
    data.mask = torch.ones_like(data.mask)  # inspect has no padding: neither has this evaluation
    trainer = MoERouterTrainer(
        model=model,
        args=MoERouterTrainingArguments(
            output_dir=str(tmp_path),
            per_device_eval_batch_size=ROWS,  # one batch, as inspect's pooled capture
            use_cpu=True,
            report_to=[],
            router_plots=False,
            router_domain_names=None,
        ),
        eval_dataset=[{k: v for k, v in data[i].items() if k != "domain_ids"} for i in range(ROWS)],
    )
    logs = trainer.evaluate()
    special = _Specialisation([full], batch_size=ROWS)
    layers, per_layer, _ = inspect_metrics(model, [full], on_batch=special)
    for name, values in specialisation_report(special.window).items():
        for layer, value in zip(special.layers, values):
            per_layer[layer][name] = value
    groups = {m.name: m.group for m in ROUTING_METRICS}
    compared = 0
    for layer in layers:
        for name, value in per_layer[layer].items():
            if (
                groups.get(name) in ("load", "batch", "specialisation")
                and f"eval_router/{name}/{layer}" in logs
            ):
                got = logs[f"eval_router/{name}/{layer}"]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (name, layer)
                compared += 1
    assert compared >= 2 * 9  # load entropy ... token-expert MI, in both layers


def test_each_evaluation_draws_the_coactivation_of_its_routing(tmp_path):
    model = routed_model()
    trainer = make_trainer(model, tmp_path, router_plots=True)
    trainer.evaluate()
    indices, _, mask, _ = eval_routing(model)
    drawn = trainer._specialisation.last_coactivation["eval"]
    for layer, idx_TK in enumerate(indices):
        expected = M.coactivation(M.coactivation_counts(idx_TK, trainer.routers[layer].num_experts, mask))
        torch.testing.assert_close(drawn[layer].double(), expected.double(), equal_nan=True)
    assert (tmp_path / "routing_coactivation_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
