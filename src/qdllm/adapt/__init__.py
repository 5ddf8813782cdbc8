"""Adapting an autoregressive LM into a masked-diffusion LM (the Dream recipe): LoRA, corpus, objective."""
