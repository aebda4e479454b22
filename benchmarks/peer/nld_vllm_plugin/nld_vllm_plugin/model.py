"""NLD's AR path in vLLM: its Mistral decoder with NLD's weight names and Llama-4 query scaling."""

from collections.abc import Iterable

import torch
from vllm.model_executor.models.mistral import MistralForCausalLM

RENAMES = (("encoder.", "model."), ("diffusion_head.", "lm_head."))


def rename(name: str) -> str:
    for old, new in RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class NLDForCausalLM(MistralForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        config = vllm_config.model_config.hf_config
        rope = getattr(config, "rope_parameters", None) or {}
        if "llama_4_scaling_beta" in rope and getattr(config, "llama_4_scaling", None) is None:
            # vLLM's Mistral attention scales queries by 1 + beta * log(1 + floor(pos / original)),
            # as NLD does, when the config carries this dict
            config.llama_4_scaling = {"original_max_position_embeddings": rope["original_max_position_embeddings"],
                                      "beta": rope["llama_4_scaling_beta"]}
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((rename(name), w) for name, w in weights)
