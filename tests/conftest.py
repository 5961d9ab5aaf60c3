"""Shared fixtures: tiny random Hugging Face checkpoints built with transformers (CPU, a few seconds).

Other tests can build variants with ``make_tiny_checkpoint(dir, model_type, **config_overrides)`` (import it with
``from conftest import make_tiny_checkpoint``) or the session fixture ``make_checkpoint(model_type, **overrides)``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

# Triton kernels on CPU tensors run in Triton's interpreter, which must be on before they are defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
PAD_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
TOKENIZER_VOCAB_SIZE = 300
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Write a haiku about the sea: waves fold into foam, salt wind on the shore.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Unicode: café, naïve, 東京, emoji 🙂.",
]
DEFAULT_GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                      "repetition_penalty": 1.1, "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]}
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def build_tokenizer():
    """A byte-level BPE tokenizer (``tokenizers``) with TOKENIZER_VOCAB_SIZE entries, specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TRAINING_TEXT * 10, trainer)
    return tok


def save_tokenizer(path: str, chat_template_file: bool = False) -> None:
    """tokenizer.json + tokenizer_config.json; the chat template inline or (transformers 5 layout) in
    chat_template.jinja."""
    build_tokenizer().save(os.path.join(path, "tokenizer.json"))
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
                  "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template_file:
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATE)
    else:
        tok_config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2)


def tiny_config(model_type: str, **overrides):
    """A transformers config object for a tiny model of ``model_type``; ``overrides`` go to its constructor."""
    import transformers

    kwargs = dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.1,  # wider than the default 0.02, so greedy argmaxes are not near-ties
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return getattr(transformers, CONFIG_CLASSES[model_type])(**kwargs)


def make_tiny_checkpoint(tmp_dir, model_type: str, *, seed: int = 0, max_shard_size=None,
                         generation: dict | None = None, chat_template_file: bool = False,
                         **overrides) -> str:
    """Save a random tiny ``model_type`` model (safetensors), tokenizer and generation_config.json to
    ``tmp_dir`` and return its path. ``max_shard_size`` (e.g. "100KB") gives a sharded checkpoint;
    ``generation`` replaces the generation_config.json contents; ``overrides`` go to the config."""
    from transformers import AutoModelForCausalLM

    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    model.eval()
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **save_kwargs)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(DEFAULT_GENERATION if generation is None else generation, f, indent=2)
    save_tokenizer(path, chat_template_file=chat_template_file)
    return path


def load_reference_model(path: str):
    """The transformers model saved at ``path`` (float32, eval mode): the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny ops (``pytestmark = pytest.mark.usefixtures("one_thread")``): with 2 threads on a
    shared 2-core machine every op waits for a descheduled worker (measured: 0.1 s -> 20 s per test); one thread is
    also the fastest when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """Llama, 2 layers, GQA 4/2, llama3 rope scaling, untied lm_head."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama", rope_parameters=dict(LLAMA3_ROPE))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> str:
    """Qwen2, 2 layers, q/k/v bias, tied embeddings (as the small Qwen2.5 models)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> str:
    """Qwen3, 3 layers, q/k norm, explicit head_dim 32 (!= hidden/heads), chat template in chat_template.jinja."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", num_hidden_layers=3,
                                head_dim=32, rope_theta=1000000.0, chat_template_file=True)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(model_type, **kwargs) -> path``: make_tiny_checkpoint in a fresh session temp dir."""

    def make(model_type: str, **kwargs) -> str:
        return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{model_type}"), model_type, **kwargs)

    return make


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own load of the SmolLM2 GGUF (float32): the independent reference for the real model."""
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF weights
    transformers = pytest.importorskip("transformers")
    from mtpserve.engine.loader.gguf import default_gguf_path

    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """Our load of the SmolLM2 GGUF (shared: loading takes several seconds)."""
    from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf

    return load_gguf(default_gguf_path())
