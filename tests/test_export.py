"""export_to_family: a routed model whose routers are linear in form becomes a stock family model.

The saved checkpoint must load with plain transformers in a process that cannot import
hf_moe_routers and without remote code, to the routed model's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import model_inputs, tiny_model
from test_modeling import realign

import hf_moe_routers as H
from hf_moe_routers.cli import main as cli_main
from hf_moe_routers.export import dense_gate_of, export_to_family

ALL_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch_transformers")
EXPORTABLE = {
    "linear": H.LinearRouterConfig(),
    "sr_moe_penalty": H.SRMoEConfig(stable_rank_weight=0.1),
    # a bound below σ, so the constraint really rescales W and the fold is exercised
    "sr_moe_constrain": H.SRMoEConfig(spectral_mode="constrain", spectral_bound=0.3),
    "sr_moe_tau": H.SRMoEConfig(temperature=0.5, spectral_mode="none"),
}
NOT_EXPORTABLE = {
    "prototype": (H.SRMoEConfig(scoring="prototype"), "scoring='prototype'"),
    "l2r": (H.L2RConfig(rank=4), "'l2r'"),
    "cosine": (H.CosineRouterConfig(dim=6), "'cosine'"),
}
STOCK_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_moe_routers"] = None  # the package must not be importable here
    import torch
    folder, family, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)  # the parent's count: CPU reductions round by thread count
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    config = json.load(open(folder + "/config.json"))
    assert not config.get("auto_map") and not config["model_type"].startswith("routed_"), config
    auto = AutoModelForSeq2SeqLM if family == "switch_transformers" else AutoModelForCausalLM
    model = auto.from_pretrained(folder, trust_remote_code=False).eval()
    for tensor in list(model.parameters()) + list(model.buffers()):
        tensor.data = tensor.data.clone()  # aligned copies, as in the parent (see realign)
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        torch.save(model(**inputs).logits, folder + "/logits.pt")
    print(type(model).__module__, type(model).__name__)
    """
)


def _patched(family, router_config):
    model = H.patch_moe_routers(tiny_model(family), router_config)
    with torch.no_grad():  # move the gates away from the patch so a dropped fold would show
        for router in (m for m in model.modules() if hasattr(m, "scorer")):
            for parameter in router.scorer.parameters():
                parameter.mul_(1.5)
    return model.eval()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("router_name", sorted(EXPORTABLE))
def test_export_gives_the_family_class_with_identical_logits(family, router_name):
    model = _patched(family, EXPORTABLE[router_name])
    inputs = model_inputs(family)
    exported = export_to_family(model)
    assert type(exported).__module__.startswith("transformers.models.")
    assert not any("scorer" in name for name in exported.state_dict())
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, model(**inputs).logits)


def test_folded_gate_is_the_effective_matrix_over_tau():
    # closed form: constrain rescales W to σ = c, then τ divides the logits
    torch.manual_seed(0)
    scorer = H.routers.build_scorer(
        H.SRMoEConfig(spectral_mode="constrain", spectral_bound=0.5, temperature=2.0), 8, 4, bias=True
    )
    weight, bias = torch.randn(4, 8), torch.randn(4)
    scorer.init_from_dense(weight, bias)
    with torch.no_grad():
        scorer.spectral_bound.fill_(0.5)
    folded_w, folded_b = dense_gate_of(scorer)
    sigma = torch.linalg.matrix_norm(weight, ord=2)
    torch.testing.assert_close(folded_w, weight * (0.5 / sigma) / 2.0)
    torch.testing.assert_close(folded_b, bias / 2.0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(x @ folded_w.T + folded_b, scorer(x))


@pytest.mark.parametrize("router_name", sorted(NOT_EXPORTABLE))
def test_routers_not_linear_in_form_are_refused_with_the_reason(router_name):
    config, named = NOT_EXPORTABLE[router_name]
    model = H.patch_moe_routers(tiny_model("mixtral"), config)
    with pytest.raises(ValueError, match="not linear in its input") as error:
        export_to_family(model)
    assert named in str(error.value)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_expert_bias_exports_while_zero_and_is_refused_once_it_selects(family):
    model = _patched(family, H.LinearRouterConfig(expert_bias_update_rate=1e-3))
    inputs = model_inputs(family)
    exported = export_to_family(model)  # a zero bias selects like no bias
    assert not any(name.endswith(".expert_bias") for name in exported.state_dict())
    with torch.no_grad():
        assert torch.equal(exported(**inputs).logits, model(**inputs).logits)
    routers = [m for m in model.modules() if isinstance(m, H.modeling.RoutedRouterMixin)]
    with torch.no_grad():
        bias = routers[0].selection_bias()
        bias.copy_(torch.linspace(-0.5, 0.5, bias.numel()))
    if family == "deepseek_v3":  # its host buffer e_score_correction_bias carries the bias
        exported = export_to_family(model)
        with torch.no_grad():
            assert torch.equal(exported(**inputs).logits, model(**inputs).logits)
    else:
        with pytest.raises(ValueError, match="trained expert bias .* cannot express"):
            export_to_family(model)


def test_a_model_that_is_not_routed_is_refused():
    with pytest.raises(ValueError, match="needs a routed model"):
        export_to_family(tiny_model("mixtral"))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "switch_transformers"])
def test_exported_checkpoint_loads_with_stock_transformers_in_a_process_without_the_package(family, tmp_path):
    model = _patched(family, EXPORTABLE["sr_moe_constrain"])
    inputs = model_inputs(family)
    with torch.no_grad():
        expected = realign(model)(**inputs).logits
    export_to_family(model).save_pretrained(tmp_path)
    torch.save(inputs, tmp_path / "inputs.pt")
    threads = torch.get_num_threads()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, "-c", STOCK_LOADER, str(tmp_path), family, str(threads)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("transformers.models.")
    assert not list(tmp_path.glob("*.py"))  # no remote code
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_cli_export_writes_a_stock_checkpoint_and_refuses_other_routers(tmp_path, capsys):
    routed = tmp_path / "routed"
    _patched("mixtral", EXPORTABLE["sr_moe_penalty"]).save_pretrained(routed)
    assert cli_main(["export", str(routed), "--output_dir", str(tmp_path / "plain")]) == 0
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    l2r = tmp_path / "l2r"
    H.patch_moe_routers(tiny_model("mixtral"), H.L2RConfig(rank=4)).save_pretrained(l2r)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", str(l2r), "--output_dir", str(tmp_path / "no")])
    assert exit_info.value.code == 2
    assert "not linear in its input" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
