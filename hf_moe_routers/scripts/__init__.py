"""Runnable jobs built on the library: ``clm`` (train from scratch), ``finetune`` (patch a pretrained
model, distil, fine-tune), ``lora`` (PEFT LoRA on a patched model), ``demo`` (the patch demo) and
``launch`` (process-group set-up for distributed runs). The CLI and ``examples/`` call these; the
library below never imports them (docs/ARCHITECTURE.md)."""
