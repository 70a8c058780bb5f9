"""Routing reports: what a model's routers did on some tokens, measured one way everywhere.

``RouterCollector`` captures each router's logits and choices during a forward; the Trainer, the
``inspect`` command, the model cards and the experiments all read routing through it.
"""

from .collector import RouterCapture, RouterCollector, RouterInfo, find_routers, routing_scoring

__all__ = ["RouterCapture", "RouterCollector", "RouterInfo", "find_routers", "routing_scoring"]
