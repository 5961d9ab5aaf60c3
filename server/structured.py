"""``response_format`` turned into a grammar: each choice of a request gets its own matcher
(engine/grammar.py), which masks the tokens it verifies and the drafts MTP proposes for it."""

from __future__ import annotations

from mtpserve.engine.grammar import Grammar, json_schema_grammar, ll_tokenizer
from mtpserve.server.errors import APIError


def schema_of(body) -> dict | None:
    """The JSON schema the answer must follow, or None."""
    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema.schema_ is None:
        return {"type": "object"}
    return fmt.json_schema.schema_


def grammar_maker(body, engine):
    """A function that makes one choice's Grammar, or None when the answer is free text."""
    schema = schema_of(body)
    if schema is None:
        return None
    try:
        grammar = json_schema_grammar(schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", "response_format") from None
    vocab_size = engine.model_config.vocab_size
    tokenizer = ll_tokenizer(engine.tokenizer, vocab_size, engine.eos_token_ids)

    def make() -> Grammar:
        return Grammar(tokenizer, grammar, vocab_size)
    return make
