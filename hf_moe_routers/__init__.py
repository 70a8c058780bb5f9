"""hf-moe-routers: better routers for Hugging Face Mixture-of-Experts models."""

__version__ = "0.1.0"
