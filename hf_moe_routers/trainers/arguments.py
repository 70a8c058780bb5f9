"""``MoERouterTrainingArguments``: ``TrainingArguments`` plus the routing losses and metric options."""

from __future__ import annotations

import dataclasses

from transformers import TrainingArguments

BALANCE_LOSSES = ("per_layer", "pooled", "model", "none")
#: Over which tokens the balance loss's load fractions f and probabilities P are taken
#: (``trainers/losses.py``; docs/ROUTERS.md section 6).
BALANCE_GRANULARITIES = ("micro_batch", "sequence", "global_batch")


@dataclasses.dataclass
class MoERouterTrainingArguments(TrainingArguments):
    """Training arguments of ``MoERouterTrainer``.

    Loss weights left at ``None`` follow the model: the balance weight is the config's
    ``router_aux_loss_coef``, the z-loss weight its ``router_z_loss_coef`` (0 when absent), and the
    spectral / stable-rank weights are each router's own (``SRMoEConfig.spectral_weight``, ...).
    """

    router_balance_loss: str = dataclasses.field(
        default="per_layer",
        metadata={
            "help": "Load-balancing loss: 'per_layer' (mean over layers of E·Σ f_e·P_e, our default), "
            "'pooled' (transformers' form: counts and probabilities pooled over layers before the "
            "product), 'model' (leave the model's own aux loss, output_router_logits as configured), "
            "or 'none'."
        },
    )
    router_balance_granularity: str = dataclasses.field(
        default="micro_batch",
        metadata={
            "help": "Tokens the balance loss's f and P are taken over: 'micro_batch' (each process's "
            "micro-batch, the default), 'sequence' (DeepSeek-V3's sequence-wise loss: per sequence, "
            "then the mean over sequences), or 'global_batch' (f from the expert counts summed over "
            "all processes and over the optimizer step's micro-batches so far, times each "
            "micro-batch's own P; arXiv 2501.11873). Needs router_balance_loss 'per_layer' or 'pooled'."
        },
    )
    router_balance_loss_weight: float | None = dataclasses.field(
        default=None, metadata={"help": "Weight of the balance loss; None = config.router_aux_loss_coef."}
    )
    router_z_loss_weight: float | None = dataclasses.field(
        default=None, metadata={"help": "Weight of the router z-loss; None = config.router_z_loss_coef or 0."}
    )
    router_spectral_weight: float | None = dataclasses.field(
        default=None, metadata={"help": "Override every router's spectral-penalty weight λ_σ."}
    )
    router_stable_rank_weight: float | None = dataclasses.field(
        default=None, metadata={"help": "Override every router's stable-rank-penalty weight λ_sr."}
    )
    router_flip_epsilon: float = dataclasses.field(
        default=0.01, metadata={"help": "Relative noise ε of the flip-rate metric: x + ε‖x‖·n."}
    )
    router_costly_metrics_interval: int = dataclasses.field(
        default=1,
        metadata={
            "help": "Compute the costlier metrics (spectral norm, stable rank, Lipschitz bound, flip "
            "rate, angular concentration, drift) every N logging steps (and at every evaluation)."
        },
    )
    router_metrics_max_tokens: int = dataclasses.field(
        default=1024, metadata={"help": "Tokens sampled per router for flip rate, concentration and drift."}
    )
    router_log_per_layer: bool = dataclasses.field(
        default=True, metadata={"help": "Log router/<metric>/<layer> besides the mean over layers."}
    )
    router_specialisation: bool = dataclasses.field(
        default=True,
        metadata={
            "help": "Log the specialisation metrics of each window: co-activation top partner, "
            "vocabulary specialisation, token-expert mutual information, and domain specialisation when "
            "the batches carry router_domain_key (hf_moe_routers.metrics.catalog)."
        },
    )
    router_domain_names: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Names of the domains that the batches' router_domain_key entries index (e.g. the "
            "plays of a corpus); with them the Trainer logs domain_tv and domain_kl."
        },
    )
    router_domain_key: str = dataclasses.field(
        default="domain_ids",
        metadata={
            "help": "Batch entry holding each sequence's domain id [B] (or each token's [B, S]; -1 = "
            "none); kept by remove_unused_columns and taken out before the forward."
        },
    )
    router_saturation_reference: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Log router_saturation at each evaluation: the top-k overlap with the routing of "
            "'first' (the first evaluation's, on the same batches) or of a saved checkpoint (a path; "
            "it runs beside the model on every evaluation batch)."
        },
    )
    router_plots: bool = dataclasses.field(
        default=True, metadata={"help": "Write routing plots (PNG, TensorBoard images) into output_dir."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_balance_loss not in BALANCE_LOSSES:
            raise ValueError(
                f"router_balance_loss must be one of {', '.join(repr(b) for b in BALANCE_LOSSES)}; "
                f"got {self.router_balance_loss!r}."
            )
        if self.router_balance_granularity not in BALANCE_GRANULARITIES:
            raise ValueError(
                "router_balance_granularity must be one of "
                f"{', '.join(repr(g) for g in BALANCE_GRANULARITIES)}; "
                f"got {self.router_balance_granularity!r}."
            )
        if self.router_balance_granularity != "micro_batch" and self.router_balance_loss not in (
            "per_layer",
            "pooled",
        ):
            raise ValueError(
                f"router_balance_granularity={self.router_balance_granularity!r} needs "
                "router_balance_loss 'per_layer' or 'pooled' (the Trainer's own balance loss); "
                f"got router_balance_loss={self.router_balance_loss!r}."
            )
        for name in (
            "router_balance_loss_weight",
            "router_z_loss_weight",
            "router_spectral_weight",
            "router_stable_rank_weight",
        ):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None; got {value!r}.")
        if not self.router_flip_epsilon >= 0:
            raise ValueError(f"router_flip_epsilon must be >= 0; got {self.router_flip_epsilon!r}.")
        if (
            not isinstance(self.router_costly_metrics_interval, int)
            or self.router_costly_metrics_interval < 1
        ):
            raise ValueError(
                f"router_costly_metrics_interval must be an integer >= 1; got {self.router_costly_metrics_interval!r}."
            )
        if self.router_domain_names is not None and len(self.router_domain_names) == 0:
            raise ValueError("router_domain_names must name at least one domain, or be None.")
        if not self.router_domain_key:
            raise ValueError("router_domain_key must be a non-empty batch key; got ''.")
        if self.router_saturation_reference == "":
            raise ValueError(
                "router_saturation_reference must be None, 'first' or the path of a saved checkpoint; got ''."
            )
        if not isinstance(self.router_metrics_max_tokens, int) or self.router_metrics_max_tokens < 2:
            raise ValueError(
                f"router_metrics_max_tokens must be an integer >= 2; got {self.router_metrics_max_tokens!r}."
            )
