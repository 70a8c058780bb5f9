"""LoRA on the fused experts of a routed MoE, routers fully trainable, adapter saved (and merged).

    python examples/finetune_lora.py --model_name_or_path outputs/main_job --output_dir outputs/lora
    python examples/finetune_lora.py --model_name_or_path path/to/olmoe --router_type sr_moe --merge true

Reload the adapter on a freshly loaded (or freshly patched) base:

    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained("outputs/main_job")
    model = PeftModel.from_pretrained(base, "outputs/lora")
"""

from hf_moe_routers.scripts.common import run_script
from hf_moe_routers.scripts.lora import main

if __name__ == "__main__":
    run_script(main, "examples/finetune_lora.py")
