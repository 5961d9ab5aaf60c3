"""Text <-> token ids (HF ``tokenizers`` backend) and chat-template rendering."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from mtpserve.engine.chat_template import render_chat_template
from mtpserve.engine.errors import ModelLoadError, RequestError

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special tokens and chat template of a model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ):
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        # Does the backend's post-processor already add bos/eos? Then we must not add them again.
        empty = backend.encode("", add_special_tokens=True).ids
        self._backend_adds_bos = self.bos_token_id is not None and self.bos_token_id in empty
        self._backend_adds_eos = self.eos_token_id is not None and self.eos_token_id in empty

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load an HF tokenizer directory
        (tokenizer.json + tokenizer_config.json [+ chat_template.jinja])."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(
                f"{path}: no tokenizer.json (only fast HF tokenizers are supported)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # noqa: BLE001 - any parse failure is a load error
            raise ModelLoadError(f"{tokenizer_file}: cannot be read as a tokenizer ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        special = _read_json(path / "special_tokens_map.json")
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token", special.get("bos_token"))),
            eos_token=_token_content(config.get("eos_token", special.get("eos_token"))),
            chat_template=_find_chat_template(path, config),
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and not self._backend_adds_bos:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None and not self._backend_adds_eos:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render a conversation to a prompt string;
        RequestError if there is no template or it refuses."""
        if self.chat_template is None:
            raise RequestError("this model has no chat template; "
                               "send a raw prompt to /v1/completions instead")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None


def _token_content(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token


def _find_chat_template(path: Path, config: dict) -> str | None:
    """chat_template.jinja (newest transformers) > chat_template.json > tokenizer_config.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template_json = _read_json(path / "chat_template.json")
    template = template_json.get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template


# Pre-tokenizer split patterns per GGUF ``tokenizer.ggml.pre`` (the regexes llama.cpp applies).
_DIGIT_SPLIT = r"\p{N}"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = {"gpt2", "default", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2_PRE = {
    "smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva",
}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2"}


def _byte_level_pre_tokenizer(pre: str | None):
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre is None or pre in _GPT2_PRE:
        return gpt2
    if pre in _DIGITS_THEN_GPT2_PRE:  # every digit on its own, then the GPT-2 split
        digits = pre_tokenizers.Split(Regex(_DIGIT_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([digits, gpt2])
    if pre in _LLAMA3_PRE:
        split = _LLAMA3_SPLIT
    elif pre in _QWEN2_PRE:
        split = _QWEN2_SPLIT
    else:
        log.warning("unknown GGUF pre-tokenizer %r: using the GPT-2 split "
                    "(tokenization may differ)", pre)
        return gpt2
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _add_special(
    backend: tokenizers.Tokenizer, tokens: list[str], token_types: list[int] | None
) -> None:
    """Control tokens become special added tokens,
    user-defined ones plain added tokens (matched whole)."""
    types = token_types or []
    control = []
    user = []
    for token, kind in zip(tokens, types):
        if kind == TOKEN_CONTROL:
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == TOKEN_USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def build_byte_level_bpe(
    tokens: list[str], merges: list[str], token_types: list[int] | None, pre: str | None
) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE from a vocabulary
    (already in the byte alphabet) and ``"a b"`` merges."""
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _LLAMA3_PRE)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    _add_special(backend, tokens, token_types)
    return backend


def build_sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    token_types: list[int] | None,
    *,
    unk_id: int | None,
    add_space_prefix: bool = True,
) -> tokenizers.Tokenizer:
    """SentencePiece BPE (llama/mistral style, byte fallback);
    merges rebuilt from the token scores."""
    vocab = {token: i for i, token in enumerate(tokens)}
    types = token_types or [1] * len(tokens)
    candidates = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != 1 or len(token) < 2:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                candidates.append((-score, vocab[left], vocab[right], left, right))
    candidates.sort()
    merges = [(left, right) for _, _, _, left, right in candidates]
    unk = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(bpe)
    scheme = "first" if add_space_prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme,
                                                     split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    types = [TOKEN_CONTROL if k == 2 else k for k in types]  # unknown (2) counts as control
    _add_special(backend, tokens, types)
    return backend
