"""vLLM plugin: `vllm serve <NLD checkpoint>` runs the model's AR path, with no converted copy.

Contract: `register()` (entry point `vllm.general_plugins`, called by vLLM in every process it
starts) teaches transformers the `nemotron_labs_diffusion` config (Ministral3's fields: YaRN
`rope_parameters` with `llama_4_scaling_beta`) and registers the architecture
`NemotronLabsDiffusionModel` as a Mistral decoder whose weights are renamed on load
(`encoder.` -> `model.`, `diffusion_head.` -> `lm_head.`). NLD's AR mode is exactly that
causal decoder. Non-goals: diffusion and self-speculation (no released vLLM has them); this
package exists for `benchmarks/peer_vllm.py` and is installed only in its own venv.
"""

ARCHITECTURE = "NemotronLabsDiffusionModel"
MODEL_TYPE = "nemotron_labs_diffusion"


def register() -> None:
    from transformers import AutoConfig
    from transformers.models.ministral3 import Ministral3Config
    from vllm import ModelRegistry

    class NemotronLabsDiffusionConfig(Ministral3Config):
        model_type = MODEL_TYPE

    try:
        AutoConfig.register(MODEL_TYPE, NemotronLabsDiffusionConfig)
    except ValueError:
        pass  # already registered in this process
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "nld_vllm_plugin.model:NLDForCausalLM")
