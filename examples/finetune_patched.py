"""Load a saved MoE checkpoint, swap its routers, optionally distil them, fine-tune and save.

    python examples/finetune_patched.py --model_name_or_path path/to/olmoe --router_type sr_moe \\
        --output_dir outputs/olmoe-sr
    python examples/finetune_patched.py --model_name_or_path path/to/mixtral --router_type l2r \\
        --router_kwargs '{"rank": 16, "num_anchors": 4}' --distill_steps 100 --output_dir outputs/mixtral-l2r
    # resume: the router state comes back from the checkpoint
    python examples/finetune_patched.py ... --resume_from_checkpoint outputs/mixtral-l2r/checkpoint-50
"""

from hf_moe_routers.scripts.common import run_script
from hf_moe_routers.scripts.finetune import main

if __name__ == "__main__":
    run_script(main, "examples/finetune_patched.py")
