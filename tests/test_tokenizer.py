"""Tokenizer and chat template: parity with transformers on SmolLM2's GGUF, HF directories, SentencePiece."""

import json
import os

import gguf
import numpy as np
import pytest
import tokenizers
from tokenizers import processors

from mtpserve.engine.chat_template import render_chat_template
from mtpserve.engine.errors import ModelLoadError, RequestError
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf_tokenizer
from mtpserve.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo(Bar):\n\tpass\n",
    "naïve café, Straße, Привет мир, 日本語のテキスト, 한국어, عربى",
    "emoji 🙂🚀👩‍👩‍👧 and ✓ ✗ → ∞",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnew\r\nlines\n\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "it's we're they'll I'd you've",
    "",
    " ",
    "x  123 and 3.14159, 1,000,000 in 2024; ½ ²",
]


@pytest.fixture(scope="module")
def ours():
    return load_gguf_tokenizer(default_gguf_path())


@pytest.fixture(scope="module")
def hf():
    path = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def llama_cpp_reference(hf, text):
    """SmolLM2's pre-tokenizer (llama.cpp 'smollm', and the model's own tokenizer.json) isolates every
    digit before the GPT-2 split. transformers' GGUF converter skips that step, so split first and let
    transformers encode each piece."""
    regex = pytest.importorskip("regex")
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    ids = []
    for piece in pieces:
        ids += hf.encode(piece, add_special_tokens=False)
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == llama_cpp_reference(hf, text)
    if not any(c.isdigit() for c in text):
        assert ids == hf.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_digits_are_isolated_like_llama_cpp(ours, hf):
    # "  1": llama.cpp/HF-original give "ĠĠ" + "1"; transformers' GGUF tokenizer gives "Ġ", "Ġ", "1".
    assert ours.encode("  1") == [ours.token_to_id("ĠĠ"), ours.token_to_id("1")]
    assert ours.encode("12345") == [ours.token_to_id(d) for d in "12345"]


def test_special_tokens(ours, hf):
    assert (ours.bos_token_id, ours.eos_token_id) == (hf.convert_tokens_to_ids("<|im_start|>"), 2)
    assert ours.vocab_size == len(hf) == 49152
    assert ours.encode("<|im_start|>") == [1]
    assert ours.decode([1, 19556, 2]) == "Hello"
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi", add_special_tokens=False)  # no bos


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語 🙂"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, hf, messages, add_generation_prompt):
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


FEATURES = """{%- for m in messages %}
  {%- if m.role == 'bad' %}{{ raise_exception('role bad is not allowed: ' ~ m.content) }}{% endif %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  <{{ m.role }}>{{ m.content | tojson }}
  {%- if m.content is not string %}{% for part in m.content %}[{{ part.text }}]{% endfor %}{% endif %}
  {%- if loop.index > 3 %}{% break %}{% endif %}
{%- endfor %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{% generation %}{{ bos_token }}|{{ eos_token }}{% endgeneration %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def test_template_features_match_transformers(hf):
    messages = [
        {"role": "user", "content": "héllo \"quoted\" <b>&</b> 🙂"},
        {"role": "skip", "content": "hidden"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": "日本"}}}]
    want = hf.apply_chat_template(messages, chat_template=FEATURES, tools=tools, tokenize=False,
                                  add_generation_prompt=True)
    got = render_chat_template(
        FEATURES, messages, add_generation_prompt=True, bos_token=hf.bos_token, eos_token=hf.eos_token, tools=tools
    )
    assert got == want
    assert '"héllo \\"quoted\\" <b>&</b> 🙂"' in got and '[\n  {\n    "type": "function"' in got


def test_raise_exception_and_missing_template(ours):
    with pytest.raises(RequestError, match="role bad is not allowed: x"):
        render_chat_template(FEATURES, [{"role": "bad", "content": "x"}], add_generation_prompt=True,
                             bos_token=None, eos_token=None)
    with pytest.raises(RequestError, match="chat template"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}],
                             add_generation_prompt=False, bos_token=None, eos_token=None)
    bare = Tokenizer(ours.backend, bos_token=None, eos_token=None, chat_template=None)
    with pytest.raises(RequestError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert render_chat_template("{{ strftime_now('%Y') | length }}", [], add_generation_prompt=False,
                                bos_token=None, eos_token=None) == "4"


def test_from_dir(tmp_path, ours):
    ours.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": "D{{ messages | length }}"},
                          {"name": "tool_use", "template": "T"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode("Hello world") == [1, 19556, 905]
    assert tok.encode("Hello world", add_special_tokens=False) == [19556, 905]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "J<|im_start|>"

    # A post-processor that already adds bos must not get a second one.
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                           special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_dir(tmp_path).encode("Hello world") == [1, 19556, 905]

    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "t", "▁h", "he", "ll", "hell", "hello", "▁hello",
             "▁w", "or", "▁wor", "ld", "▁world", "▁the", "▁t", "th"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 32), ("head_count", 2), ("head_count_kv", 2)):
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(words))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(words))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    ours = load_gguf_tokenizer(str(tmp_path / "sp.gguf"))
    for text in ["hello world", " hello  world", "the world!", "héllo\nwor ld 日本", "<s>hello</s>", ""]:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("hello")[0] == 1
    assert ours.decode(ours.encode("héllo"), skip_special_tokens=False) == "<s> héllo"
