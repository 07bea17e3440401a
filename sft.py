"""QLoRA instruction fine-tuning of Gemma 3 from a YAML recipe.

    accelerate launch sft.py recipes/gemma3_belle.yaml                 # the mission: gemma-3-4b-it on 2,000 Belle rows
    python sft.py recipes/gemma3_270m_belle_demo.yaml                  # embedded Gemma 3 270M, CPU-friendly demo
    python sft.py recipes/gemma3_belle.yaml --data_path my.jsonl --dry_run   # check your data before paying for a GPU

Every recipe key is a TRL field name (ScriptArguments, SFTConfig, ModelConfig) or one of our data, run and speed
fields (gemma_sft/config.py); flags override the recipe. The original tool's --model_path, --data_path, --epochs,
--batch_size and --output_path still work.
"""

from gemma_sft.commands.train import RUN_OPTIONS, main
from gemma_sft.errors import run

__all__ = ["main"]

if __name__ == "__main__":
    run(main, **RUN_OPTIONS)
