"""Publishing routed models: model cards, remote code for plain transformers, Hub uploads.

>>> from hf_moe_routers.hub import push_routed_to_hub, save_routed_pretrained
>>> save_routed_pretrained(model, "mixtral-l2r")      # loads with or without hf-moe-routers
>>> push_routed_to_hub(model, "me/mixtral-l2r")       # the same folder, in one Hub commit
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
from .publish import push_folder_to_hub, push_routed_to_hub, save_routed_pretrained, write_hub_files
from .remote_code import (
    ENTRY_MODULE,
    RemoteCodeFile,
    auto_map_for,
    check_remote_code,
    prepare_remote_code,
    remote_code_files,
)

__all__ = [
    "CARD_MARKER",
    "ENTRY_MODULE",
    "PLOT_FILES",
    "MetricsTable",
    "RemoteCodeFile",
    "auto_map_for",
    "build_model_card",
    "check_remote_code",
    "folder_model_card",
    "is_generated_card",
    "prepare_remote_code",
    "push_folder_to_hub",
    "push_routed_to_hub",
    "remote_code_files",
    "routing_metrics_table",
    "save_routed_pretrained",
    "template_text",
    "write_hub_files",
    "write_model_card",
    "write_trainer_model_card",
]
