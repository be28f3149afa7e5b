"""Checkpoints of other frameworks in and out: `hf` reads and writes Hugging Face LLaVA-1.5 and PaliGemma
directories (`hf_config` for config.json, `hf_weights` for the safetensors)."""
