"""Runnable jobs built on the library: ``clm`` (train from scratch), ``finetune`` (patch a pretrained
model, distil, fine-tune), ``lora`` (PEFT LoRA on a patched model), ``demo`` (the patch demo) and
``launch`` (process-group teardown for distributed runs). ``common`` is the run the training jobs
share (flags, corpus, tokenizer, train and evaluate, save) and ``report`` what they print and write
at the end; no job imports another. The CLI and ``examples/`` call these; the library below never
imports them (docs/ARCHITECTURE.md)."""
