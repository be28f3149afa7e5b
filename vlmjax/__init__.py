"""vlmjax: vision-language models in JAX/Flax.

    import vlmjax
    vlm = vlmjax.load(path)   # a vlmjax workdir, or a Hugging Face LLaVA-1.5 / PaliGemma directory
"""

from vlmjax.api import VLM, load

__version__ = "0.1.0"
__all__ = ["VLM", "load", "__version__"]
