"""Model families by architecture name (``ModelConfig.architecture``)."""

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.models.glm4_moe import Glm4MoeForCausalLM
from mtpserve.engine.models.llama import LlamaForCausalLM
from mtpserve.engine.models.qwen3_next import Qwen3NextForCausalLM

MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "glm4_moe": Glm4MoeForCausalLM,
    "qwen3_next": Qwen3NextForCausalLM,
    # same blocks; the DeltaNet projections stored apart, dense MLPs
    "qwen3_5_text": Qwen3NextForCausalLM,
    "qwen3_5_moe_text": Qwen3NextForCausalLM,
}


def model_class(arch: str):
    if arch not in MODEL_CLASSES:
        known = ", ".join(MODEL_CLASSES)
        raise ModelLoadError(f"no model class for architecture '{arch}' (known: {known})")
    return MODEL_CLASSES[arch]
