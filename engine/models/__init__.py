"""Model families by architecture name."""


def model_class(arch: str):
    from mtpserve.engine.models.llama import LlamaForCausalLM

    classes = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
               "qwen3": LlamaForCausalLM}
    if arch == "glm4_moe":
        from mtpserve.engine.models.glm4_moe import Glm4MoeForCausalLM

        return Glm4MoeForCausalLM
    return classes[arch]
