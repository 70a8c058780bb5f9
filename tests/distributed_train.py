"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2 --cpu`."""

import json
import sys
from pathlib import Path

from conftest import RandomTokens, tiny_model

import hf_moe_routers as H
from hf_moe_routers.scripts.launch import end_distributed
from hf_moe_routers.trainers import MoERouterTrainer, MoERouterTrainingArguments

output = Path(sys.argv[1])
model = H.patch_moe_routers(tiny_model("mixtral"), H.SRMoEConfig())
args = MoERouterTrainingArguments(
    output_dir=str(output),
    per_device_train_batch_size=4,
    max_steps=2,
    logging_steps=2,
    use_cpu=True,
    report_to=[],
    disable_tqdm=True,
    save_strategy="no",
    router_plots=False,
    seed=0,
)
trainer = MoERouterTrainer(model=model, args=args, train_dataset=RandomTokens(64, pad_every=3))
trainer.train()
rank = trainer.args.process_index
local = trainer.last_local_window
(output / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "world_size": trainer.args.world_size,
            "loads": [v.tolist() for v in local["loads"]],
            "counts": local["counts"].tolist(),
        }
    )
)
if trainer.is_world_process_zero():
    (output / "log_history.json").write_text(json.dumps(trainer.state.log_history))
end_distributed()  # without it gloo can abort the process at exit
