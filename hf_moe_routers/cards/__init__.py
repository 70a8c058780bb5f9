"""Model cards: the README.md of every folder hf-moe-routers writes, for routed and plain MoE models.

>>> from hf_moe_routers.cards import write_model_card
>>> write_model_card(model, "mixtral-l2r", training_data="Shakespeare, 37 plays")

Below the modeling (docs/ARCHITECTURE.md): a routed model's ``save_pretrained`` writes its card
through this package, which learns the family from ``hf_moe_routers.families``.
"""

from .card_sections import PLOT_FILES, MetricsTable, routing_metrics_table
from .model_card import (
    CARD_MARKER,
    build_model_card,
    folder_model_card,
    is_generated_card,
    template_text,
    write_model_card,
    write_trainer_model_card,
)

__all__ = [
    "CARD_MARKER",
    "PLOT_FILES",
    "MetricsTable",
    "build_model_card",
    "folder_model_card",
    "is_generated_card",
    "routing_metrics_table",
    "template_text",
    "write_model_card",
    "write_trainer_model_card",
]
