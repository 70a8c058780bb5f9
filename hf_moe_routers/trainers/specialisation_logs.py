"""The specialisation metrics of the Trainer's logs: token-level counts per logged window.

Per window (train and eval apart) a :class:`~hf_moe_routers.metrics.SpecialisationAccumulator`
sums, over the micro-batches, each router's expert co-activations, (token id, expert) slot counts
and, when the batches say which domain each sequence comes from, (domain, expert) counts; padding
is never counted. At each log they give ``router/coactivation_top_partner``,
``router/vocab_specialisation``, ``router/token_expert_mi`` and ``router/domain_tv`` /
``router/domain_kl`` (names and meanings: ``hf_moe_routers.metrics.catalog``), summed over the
processes first.

Router saturation (OLMoE's top-k overlap with a reference checkpoint's routing of the same tokens)
is measured on evaluations only, where the tokens repeat: against the first evaluation's routing
(``router_saturation_reference="first"``, the reference batches kept on the CPU), or against a
saved checkpoint (a path) that runs beside the model on every evaluation batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..metrics import SpecialisationAccumulator
from ..reporting.collector import RouterCapture, RouterCollector, RouterInfo
from ..reporting.report import add_specialisation, specialisation_report
from .losses import stack_input

__all__ = ["SpecialisationLogs"]


class SpecialisationLogs:
    """Counts for the specialisation metrics of one Trainer, and the saturation references.

    Args:
        routers: the Trainer's routers, in collector order.
        device: where the counts live (the Trainer's device, so a distributed sum needs no copy).
        is_encoder_decoder: the model's routers of the decoder stack route ``decoder_input_ids``.
        domain_names: the domains the batches' ``domain_key`` entries index, or None for none.
        domain_key: the batch entry with each sequence's domain id ``[B]`` (or each token's
            ``[B, S]``; ``-1`` = none); taken out of the batch before the forward.
        saturation_reference: None, ``"first"`` or the path of a saved checkpoint.
    """

    def __init__(
        self,
        routers: Sequence[RouterInfo],
        device: torch.device | str,
        *,
        is_encoder_decoder: bool,
        domain_names: Sequence[str] | None = None,
        domain_key: str = "domain_ids",
        saturation_reference: str | None = None,
    ):
        self.routers = list(routers)
        self.device = torch.device(device)
        self.is_encoder_decoder = is_encoder_decoder
        self.domain_names = list(domain_names or [])
        self.domain_key = domain_key
        self.saturation_reference = saturation_reference
        self.windows = {mode: self._new_window() for mode in ("train", "eval")}
        # "first": the first evaluation's top-k per batch and router (CPU), filled while recording.
        self._first: list[list[torch.Tensor | None]] | None = None
        self._recording = False
        self._eval_batch = 0
        self._reference_model: nn.Module | None = None
        self._reference_collector: RouterCollector | None = None
        #: per mode, the co-activation ``P(b | a)`` ``[L, E, E]`` of the last reported window (CPU)
        self.last_coactivation: dict[str, torch.Tensor] = {}

    def _new_window(self) -> SpecialisationAccumulator:
        return SpecialisationAccumulator(
            [r.num_experts for r in self.routers], num_domains=len(self.domain_names), device=self.device
        )

    # -- per batch --------------------------------------------------------------------------------
    def pop_domains(self, inputs: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """``inputs`` without the domain entry (the model does not take it), and that entry."""
        if self.domain_key not in inputs:
            return dict(inputs), None
        rest = {k: v for k, v in inputs.items() if k != self.domain_key}
        domains = torch.as_tensor(inputs[self.domain_key])
        if not self.domain_names:
            raise ValueError(
                f"The batch has a {self.domain_key!r} entry but router_domain_names is not set: set it "
                "to the names of the domains those ids index."
            )
        return rest, domains

    def start_evaluation(self) -> None:
        """Called before each evaluation: batches are numbered from 0 again."""
        self._eval_batch = 0
        self._recording = self.saturation_reference == "first" and self._first is None
        if self._recording:
            self._first = []

    def add(
        self,
        mode: str,
        model_inputs: Mapping[str, Any],
        captures: Sequence[RouterCapture | None],
        masks: Sequence[torch.Tensor | None],
        domains: torch.Tensor | None,
    ) -> None:
        """Add one micro-batch of ``mode`` (its routers' captures and real-token masks)."""
        ids = [self._token_ids(info, model_inputs, capture) for info, capture in zip(self.routers, captures)]
        domain_ids = None
        if domains is not None:
            domain_ids = [self._token_domains(domains, model_inputs, capture) for capture in captures]
        reference = self._reference_indices(model_inputs, captures) if mode == "eval" else None
        add_specialisation(
            self.windows[mode], captures, ids, masks, domain_ids=domain_ids, reference_indices=reference
        )

    def _token_ids(
        self, info: RouterInfo, inputs: Mapping[str, Any], capture: RouterCapture | None
    ) -> torch.Tensor | None:
        ids = stack_input(info, inputs, "input_ids", self.is_encoder_decoder)
        if capture is None or not isinstance(ids, torch.Tensor) or ids.numel() != capture.indices_TK.shape[0]:
            return None  # inputs_embeds, or a decoder whose ids the model derives from the labels
        return ids.reshape(-1)

    def _token_domains(
        self, domains: torch.Tensor, inputs: Mapping[str, Any], capture: RouterCapture | None
    ) -> torch.Tensor | None:
        if capture is None:
            return None
        tokens = capture.indices_TK.shape[0]
        if domains.numel() == tokens:
            return domains.reshape(-1)
        if domains.ndim == 1 and tokens % domains.numel() == 0:  # one id per sequence
            return domains.repeat_interleave(tokens // domains.numel())
        raise ValueError(
            f"{self.domain_key!r} must hold one domain id per sequence [B] or per token [B, S]; got shape "
            f"{tuple(domains.shape)} for a batch of {tokens} routed tokens."
        )

    @torch.no_grad()
    def _reference_indices(
        self, inputs: Mapping[str, Any], captures: Sequence[RouterCapture | None]
    ) -> list[torch.Tensor | None] | None:
        if self.saturation_reference is None:
            return None
        batch = self._eval_batch
        self._eval_batch += 1
        if self.saturation_reference == "first":
            if self._recording:
                assert self._first is not None
                self._first.append([None if c is None else c.indices_TK.detach().cpu() for c in captures])
                return None  # the first evaluation is the reference: saturation 1 by definition
            if self._first is None or batch >= len(self._first):
                return None
            stored = self._first[batch]
            return [
                None if ref is None or c is None or ref.shape != c.indices_TK.shape else ref.to(self.device)
                for ref, c in zip(stored, captures)
            ]
        collector = self._load_reference()
        collector.start()
        try:
            self._reference_model(**inputs)  # type: ignore[misc]
        finally:
            theirs = collector.stop()
        return [
            None if ref is None or c is None or ref.indices_TK.shape != c.indices_TK.shape else ref.indices_TK
            for ref, c in zip(theirs, captures)
        ]

    def _load_reference(self) -> RouterCollector:
        if self._reference_collector is not None:
            return self._reference_collector
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        path = str(self.saturation_reference)
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        model = auto.from_pretrained(path).to(self.device).eval()
        collector = RouterCollector(model)
        mine = [(r.num_experts, r.top_k) for r in self.routers]
        theirs = [(r.num_experts, r.top_k) for r in collector.routers]
        if mine != theirs:
            raise ValueError(
                f"router_saturation_reference {path!r} routes with (experts, top-k) per layer {theirs}; the "
                f"model being trained with {mine}: saturation compares the routing of the same routers."
            )
        self._reference_model, self._reference_collector = model, collector
        return collector

    # -- per log ----------------------------------------------------------------------------------
    def report(self, mode: str, distributed: bool, replicas: int = 1) -> dict[str, list[float]]:
        """The window's specialisation metrics per layer (summed over processes, each batch once:
        ``replicas`` processes share a batch under tensor/expert parallelism), then a new window.

        Collective when ``distributed``: every process calls it at the same log.
        """
        window = self.windows[mode]
        if distributed:
            window.all_reduce(replicas=replicas)
        self.windows[mode] = self._new_window()
        if int(window.tokens_L.sum()) == 0:
            return {}
        self.last_coactivation[mode] = window.coactivation().cpu()
        return specialisation_report(window)
