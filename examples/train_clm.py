"""Train a routed MoE causal LM from scratch (OLMoE- or Mixtral-shaped, router chosen by flags).

    python examples/train_clm.py                                   # bundled corpus, L2R router
    python examples/train_clm.py --router_type sr_moe --router_kwargs '{"scoring": "prototype"}'
    python examples/train_clm.py --architecture mixtral --train_files texts/ --validation_files val.txt
    python examples/train_clm.py --output_dir outputs/run --resume_from_checkpoint outputs/run/checkpoint-200

Every `MoERouterTrainingArguments` / `TrainingArguments` flag works (`--bf16`, `--router_balance_loss
pooled`, `--report_to tensorboard`, ...); `python examples/train_clm.py --help` lists them.
"""

from hf_moe_routers.scripts.clm import main
from hf_moe_routers.scripts.common import run_script

if __name__ == "__main__":
    run_script(main, "examples/train_clm.py")
