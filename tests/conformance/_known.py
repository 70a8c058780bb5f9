"""The two explicit tables of the conformance run; every entry gives its reason.

``CONTROL_KNOWN_FAILURES``: transformers cases that the *unpatched* host family fails with our
testers on CPU (transformers' own CI runs these families with richer per-model testers and
per-model skips). A listed control failure is reported as xfail with its reason; an unlisted one
fails the run, so a new transformers version that breaks a family is noticed and this table updated.

``ROUTED_ALLOWED``: routed cases allowed to fail although the control passes, with the reason why
this is by design. Keep it empty unless the difference is intended: a routed failure that is a bug
belongs in the issue tracker, not here.

Keys are ``(family, case)`` for the control table and ``(family, router_type, case)`` for the routed
one; ``"*"`` matches any family / router type. ``case`` is the test method name as transformers
names it (parameterized cases with their suffix, e.g. ``test_eager_matches_sdpa_inference_00_fp16_pad_left``),
or a prefix ending in ``*``.
"""

from __future__ import annotations

CONTROL_KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("gpt_oss", "test_moe_parallel_plans_shard_experts"): (
        "transformers 5.24's gpt-oss TP plan has no entry for its experts (mlp.experts.gate_up_proj / "
        "down_proj), so the check that every parallel plan shards the experts fails for GptOssForCausalLM"
    ),
    ("switch_transformers", "test_model_base_model_prefix"): (
        "SwitchTransformersForConditionalGeneration holds its encoder and decoder directly, with no "
        "`switch_transformers` sub-module, so `model.base_model is model` (like T5)"
    ),
    ("switch_transformers", "test_training_overfit"): (
        "the mixin checks that generate() from a one-token prompt reproduces the training sequence, "
        "which assumes a decoder-only model; an encoder-decoder generates from decoder_start_token_id"
    ),
}

ROUTED_ALLOWED: dict[tuple[str, str, str], str] = {}


def _match(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def control_known_failure(family: str, case: str) -> str | None:
    for (fam, name), reason in CONTROL_KNOWN_FAILURES.items():
        if _match(fam, family) and _match(name, case):
            return reason
    return None


def routed_allowed(family: str, router_type: str, case: str) -> str | None:
    for (fam, router, name), reason in ROUTED_ALLOWED.items():
        if _match(fam, family) and _match(router, router_type) and _match(name, case):
            return reason
    return None
