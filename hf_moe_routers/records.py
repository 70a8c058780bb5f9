"""The in-memory record of routing metrics over training, shared by the Trainer and the plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class RoutingRecord:
    """Routing metrics of one logging window (training) or one evaluation.

    Attributes:
        step: ``trainer.state.global_step`` when logged.
        split: ``"train"`` or ``"eval"``.
        layers: router names in model order (e.g. ``"layer_0"``; Switch: ``"encoder_1"``, ...).
        load: per layer, the load fraction of each expert over the window ``[L][E]`` (sums to 1).
        metrics: metric name -> per-layer values ``[L]`` (e.g. ``"spectral_norm"``,
            ``"stable_rank"``, ``"flip_rate"``, ``"load_entropy"``); a metric not computed in this
            window is absent.
    """

    step: int
    split: str
    layers: list[str]
    load: list[list[float]]
    metrics: dict[str, list[float]]


@dataclasses.dataclass
class RoutingHistory:
    """Every ``RoutingRecord`` of a run, in order. JSON-serialisable."""

    records: list[RoutingRecord] = dataclasses.field(default_factory=list)

    def append(self, record: RoutingRecord) -> None:
        self.records.append(record)

    def split(self, split: str) -> list[RoutingRecord]:
        return [r for r in self.records if r.split == split]

    def to_dict(self) -> dict[str, Any]:
        return {"records": [dataclasses.asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingHistory:
        return cls([RoutingRecord(**r) for r in data.get("records", [])])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> RoutingHistory:
        return cls.from_dict(json.loads(Path(path).read_text()))
