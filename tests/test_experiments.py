"""The experiments: data splits, aggregation and selection by hand, and the ``--quick`` commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_moe_routers.experiments.data import base_new_split
from hf_moe_routers.experiments.interference import InterferenceSpec, aggregate
from hf_moe_routers.experiments.report import markdown_table, mean_std
from hf_moe_routers.experiments.sensitivity import (
    SensitivitySpec,
    matched_interference,
    select_learning_rate,
    variants,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_base_new_split_is_seeded_disjoint_and_complete():
    for seed in range(5):
        base, new = base_new_split(seed)
        assert len(base) == 8 and len(new) == 2
        assert sorted(base + new) == list(range(10))
        assert base_new_split(seed) == (base, new)
    assert len({tuple(base_new_split(s)[1]) for s in range(5)}) > 1  # seeds hold out different classes
    with pytest.raises(ValueError, match="num_new"):
        base_new_split(0, num_new=9)


def test_digits_splits_are_disjoint_stratified_and_standardised():
    pytest.importorskip("sklearn")
    from hf_moe_routers.experiments.data import load_dataset

    data = load_dataset("digits")
    sizes = [len(data.y_train), len(data.y_val), len(data.y_test)]
    assert sum(sizes) == 1797 and sizes[2] > sizes[1] > 0
    rows = {
        split: {tuple(x.flatten().tolist()) for x in data.split(split)[0]}
        for split in ("train", "val", "test")
    }
    # sklearn's digits has a handful of exact duplicate images; splits share at most those.
    assert len(rows["train"] & rows["test"]) < 10 and len(rows["val"] & rows["test"]) < 5
    for split in ("val", "test"):
        counts = torch.bincount(data.split(split)[1], minlength=10)
        assert counts.min() > 0.6 * counts.max()
    assert abs(float(data.x_train.mean())) < 1e-4 and float(data.x_train.std()) == pytest.approx(
        1.0, abs=1e-3
    )
    with pytest.raises(ValueError, match="split"):
        data.split("dev")


def test_tuning_never_reads_the_test_split():
    assert SensitivitySpec().eval_split == "val"
    assert InterferenceSpec().eval_split == "test"


def test_default_grid_is_the_issue_grid():
    spec = InterferenceSpec()
    assert spec.depths == (2, 4, 8) and set(spec.datasets) == {"digits", "mnist1d"}
    assert len(spec.routers) == 5 and len(spec.seeds) >= 5
    # One budget object per learning rate, shared by every router: only the learning rate differs.
    assert len({(b.steps, b.experts_per_layer, b.momentum) for b in spec.budgets}) == 1
    assert SensitivitySpec().depth == 8


def run(dataset, depth, router, seed, episodes, pre=0.9):
    routing = {"load_entropy": 0.5, "dead_experts": 0.0, "token_entropy": 0.5, "flip_rate": 0.0}
    by_lr = {
        lr: {"interference_pp": i, "new_accuracy": n, "exposure": e} for lr, (i, n, e) in episodes.items()
    }
    return {
        "dataset": dataset, "depth": depth, "router": router, "seed": seed, "pre_accuracy": pre,
        "episodes": by_lr, "routing": routing,
    }  # fmt: skip


def test_aggregate_means_and_spreads_by_hand():
    runs = [
        run(
            "digits",
            2,
            "linear",
            0,
            {"0.01": ([-1.0, -3.0], [0.5, 0.7], [0.1, 0.3]), "0.1": ([0.0], [1.0], [0.0])},
            0.8,
        ),
        run(
            "digits",
            2,
            "linear",
            1,
            {"0.01": ([0.0, 2.0], [0.1, 0.3], [0.2, 0.2]), "0.1": ([4.0], [0.0], [1.0])},
            1.0,
        ),
        run("digits", 4, "linear", 0, {"0.01": ([5.0], [1.0], [0.5])}),
    ]
    cells = {(c["depth"], c["learning_rate"]): c for c in aggregate(runs)}
    assert set(cells) == {(2, 0.01), (2, 0.1), (4, 0.01)}
    cell = cells[(2, 0.01)]
    assert cell["seeds"] == 2 and cell["episodes"] == 4
    assert cell["interference_pp"] == pytest.approx(-0.5)  # mean of per-seed means (-2, 1)
    assert cell["interference_pp_std_seeds"] == pytest.approx(np.std([-2.0, 1.0], ddof=1))
    assert cell["interference_pp_std_episodes"] == pytest.approx(np.std([-1.0, -3.0, 0.0, 2.0], ddof=1))
    assert cell["new_accuracy"] == pytest.approx(0.4) and cell["exposure"] == pytest.approx(0.2)
    assert cell["pre_accuracy"] == pytest.approx(0.9)
    assert cell["pre_accuracy_std"] == pytest.approx(np.std([0.8, 1.0], ddof=1))
    assert cells[(2, 0.1)]["interference_pp"] == pytest.approx(2.0) and cells[(2, 0.1)]["new_accuracy"] == 0.5
    assert cells[(4, 0.01)]["interference_pp_std_seeds"] == 0.0


def test_learning_rate_selection_uses_class_balanced_accuracy():
    summary = [
        {
            "factor": "default",
            "router": "a",
            "learning_rate": 0.01,
            "base_accuracy_after": 1.0,
            "new_accuracy": 0.0,
        },
        {
            "factor": "default",
            "router": "b",
            "learning_rate": 0.01,
            "base_accuracy_after": 1.0,
            "new_accuracy": 0.2,
        },
        {
            "factor": "default",
            "router": "a",
            "learning_rate": 0.1,
            "base_accuracy_after": 0.8,
            "new_accuracy": 0.6,
        },
        {
            "factor": "default",
            "router": "b",
            "learning_rate": 0.1,
            "base_accuracy_after": 0.9,
            "new_accuracy": 0.5,
        },
        {
            "factor": "routing",
            "router": "a",
            "learning_rate": 0.3,
            "base_accuracy_after": 1.0,
            "new_accuracy": 1.0,
        },
    ]
    chosen, scores = select_learning_rate(summary)
    # (8·base + new)/9 per router, then the mean over routers: old classes are not traded for the new one.
    assert scores == {
        0.01: pytest.approx((8.0 / 9 + 8.2 / 9) / 2),
        0.1: pytest.approx((7.0 / 9 + 7.7 / 9) / 2),
    }
    assert chosen == 0.01  # the non-default factor rows are ignored


def test_matched_interference_interpolates_along_the_curve():
    def entry(lr, new, interference):
        return {
            "factor": "default",
            "router": "a",
            "learning_rate": lr,
            "new_accuracy": new,
            "interference_pp": interference,
        }

    summary = [entry(0.1, 0.4, -2.0), entry(0.01, 0.0, 0.0), entry(1.0, 0.8, -10.0)]
    assert matched_interference(summary, "a", 0.2) == pytest.approx(-1.0)
    assert matched_interference(summary, "a", 0.6) == pytest.approx(-6.0)
    assert matched_interference(summary, "a", 0.9) is None
    assert matched_interference(summary, "b", 0.5) is None


def test_sensitivity_variants_cover_every_factor_of_the_issue():
    factors = {factor for factor, *_ in variants(SensitivitySpec())}
    assert factors == {
        "default",
        "routing temperature τ",
        "routing",
        "balance loss",
        "SR λ_σ = λ_sr",
        "SR penalties on local processors",
    }
    sr_rows = [v for v in variants(SensitivitySpec()) if v[0] == "SR λ_σ = λ_sr"]
    assert all(set(routers) <= {"sr_moe_penalty", "sr_moe_constrain"} for *_, routers in sr_rows)
    assert {v[2]["sr_weight"] for v in sr_rows} | {1e-2} >= {1e-3, 1e-2, 1e-1, 1.0}


def test_report_helpers():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


@pytest.mark.parametrize("experiment", ["interference", "sensitivity"])
def test_quick_vision_commands_write_json_markdown_and_plots(tmp_path, experiment):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from hf_moe_routers.experiments.__main__ import main

    assert main([experiment, "--quick", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"quick_{experiment}.json").read_text())
    markdown = (tmp_path / f"quick_{experiment}.md").read_text()
    assert result["experiment"] == experiment and "--quick" in result["command"]
    assert result["plots"] and all((tmp_path / p).read_bytes()[:8] == PNG for p in result["plots"])
    (tmp_path / f"quick_{experiment}.md").unlink()
    assert main([experiment, "--quick", "--replot", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / f"quick_{experiment}.md").read_text() == markdown  # redrawn from the JSON alone
    if experiment == "interference":
        cells = {(c["router"], c["learning_rate"]) for c in result["cells"]}
        assert cells == {(r, lr) for r in ("linear", "sr_moe_penalty") for lr in (0.01, 0.1)}
        for cell in result["cells"]:
            assert -100.0 <= cell["interference_pp"] <= 100.0 and 0.0 <= cell["new_accuracy"] <= 1.0
            assert 0.0 <= cell["exposure"] <= 1.0 and cell["episodes"] == 4
        assert "| linear | 2 |" in markdown
    else:
        assert result["selected_learning_rate"] in (0.01, 0.1)
        assert "Selected lr" in markdown


def test_no_residual_ablation_reaches_the_model_and_the_report(tmp_path):
    pytest.importorskip("sklearn")
    from hf_moe_routers.experiments.__main__ import main

    assert main(["interference", "--quick", "--no-residual", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quick_interference.json").read_text())
    assert result["spec"]["settings"]["residual"] is False
    assert "without residual connections" in (tmp_path / "quick_interference.md").read_text()
    # and it reaches the network: the same seed without the flag trains a different model
    assert main(["interference", "--quick", "--output-dir", str(tmp_path / "default")]) == 0
    default = json.loads((tmp_path / "default" / "quick_interference.json").read_text())
    assert default["spec"]["settings"]["residual"] is True
    assert [c["pre_accuracy"] for c in default["cells"]] != [c["pre_accuracy"] for c in result["cells"]]


def test_quick_lm_command_uses_the_trainer_script(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from hf_moe_routers.experiments.__main__ import main

    assert main(["lm", "--quick", "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "quick_lm.json").read_text())
    (lm,) = result["lm_runs"]
    assert lm["router"] == "l2r_m4" and lm["eval_perplexity"] > 1.0 and 0.0 <= lm["load_entropy"] <= 1.0
    assert lm["parameters"] > 0 and np.isfinite(lm["lm_interference_pp"])
    (vision,) = result["vision_runs"]
    assert 0.0 <= vision["test_accuracy"] <= 1.0 and vision["preset"] == "l2r"
    assert all((tmp_path / p).read_bytes()[:8] == PNG for p in result["plots"])
    assert "Experiment B" in (tmp_path / "quick_lm.md").read_text()


def test_lm_balancing_rows_train_with_their_flags_and_report_specialisation(tmp_path):
    import dataclasses
    from pathlib import Path

    from hf_moe_routers.experiments import lm

    spec = dataclasses.replace(
        lm.quick_lm_spec(), routers=("linear_bias", "l2r_m4_global"), vision_datasets=()
    )
    flags = lm._lm_flags(spec, "l2r_m4_global", 0, Path("out"), Path("tok"))
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--router_balance_granularity"] == "global_batch"
    # the optimizer step keeps the spec's blocks, now as 4 micro-batches
    assert (
        int(pairs["--gradient_accumulation_steps"]) * int(pairs["--per_device_train_batch_size"])
        == spec.batch_size
    )
    bias = dict(zip(*[iter(lm._lm_flags(spec, "linear_bias", 0, Path("out"), Path("tok")))] * 2))
    assert bias["--router_balance_loss"] == "none"
    assert json.loads(bias["--router_kwargs"])["expert_bias_update_rate"] > 0

    result = lm.run_lm(spec, tmp_path, command="test", log=lambda message: None)
    assert [run["router"] for run in result["lm_runs"]] == ["linear_bias", "l2r_m4_global"]
    assert result["vision_runs"] == []  # no vision counterpart for the Trainer's balancing variants
    k_over_e = spec.num_experts_per_tok / spec.num_experts
    for run in result["lm_runs"]:
        assert k_over_e <= run["vocab_specialisation"] <= 1.0
        assert np.isfinite(run["token_expert_mi"]) and np.isfinite(run["coactivation_top_partner"])
        assert 0.0 <= run["domain_tv"] <= 1.0  # the two validation plays are the domains
    table = (tmp_path / "lm.md").read_text()
    assert "linear, expert bias (no aux loss)" in table and "domain TV" in table


def test_bad_experiment_name_is_rejected():
    from hf_moe_routers.experiments.__main__ import main

    with pytest.raises(SystemExit):
        main(["nonsense"])
