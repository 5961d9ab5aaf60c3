"""The grammar a chat or completion answer follows: ``response_format`` (a JSON schema), or the
calls a forced ``tool_choice`` demands (server/tool_grammar.py). Each choice of a request gets its
own matcher (engine/grammar.py), which masks the tokens it verifies and the drafts MTP proposes."""

from __future__ import annotations

from mtpserve.engine.grammar import Grammar, json_schema_grammar, lark_grammar, ll_tokenizer
from mtpserve.server.chat_output import OutputSpec
from mtpserve.server.chat_prompt import forced_function
from mtpserve.server.errors import APIError
from mtpserve.server.tool_grammar import lit, tool_call_grammar


def schema_of(body) -> dict | None:
    """The JSON schema the answer must follow, or None."""
    fmt = getattr(body, "response_format", None)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object" or fmt.json_schema.schema_ is None:
        return {"type": "object"}
    return fmt.json_schema.schema_


def marker_writer(tokenizer, ll_tok):
    """How a tool-call marker is written in a grammar: a reference to the token when it is one of
    the vocabulary's special tokens (its text alone cannot produce it), else its text."""
    def mark(text: str) -> str:
        token_id = tokenizer.token_to_id(text)
        if token_id is not None and ll_tok.is_special_token(token_id):
            return f"<[{token_id}]>"
        return lit(text)
    return mark


def forced_calls_grammar(body, spec: OutputSpec | None, tokenizer, ll_tok) -> str | None:
    """The grammar of a forced tool_choice's calls, or None when no call is forced."""
    if spec is None or spec.tool_format is None:
        return None
    forced, function = forced_function(body)
    if not forced:
        return None
    if schema_of(body) is not None:
        raise APIError(400, "response_format cannot be combined with a tool_choice that forces a "
                            "call", "response_format")
    text = tool_call_grammar(spec.tool_format.name, spec.tools, function,
                             not spec.single_call, marker_writer(tokenizer, ll_tok))
    try:
        return lark_grammar(text)
    except ValueError as e:
        raise APIError(400, f"tools: {e}", "tools") from None


def response_grammar(body) -> str | None:
    """The grammar of response_format's schema, or None for free text."""
    schema = schema_of(body)
    if schema is None:
        return None
    try:
        return json_schema_grammar(schema)
    except ValueError as e:
        raise APIError(400, f"response_format: {e}", "response_format") from None


def grammar_maker(body, engine, spec: OutputSpec | None = None):
    """A function that makes one choice's Grammar, or None when the answer is free text.
    ``spec``: how a chat answer is read (its tools), None for a completion."""
    if schema_of(body) is None and (spec is None or spec.tool_format is None):
        return None
    vocab_size = engine.model_config.vocab_size
    ll_tok = ll_tokenizer(engine.tokenizer, vocab_size, engine.eos_token_ids)
    grammar = forced_calls_grammar(body, spec, engine.tokenizer, ll_tok)
    param = "tools"
    if grammar is None:
        grammar = response_grammar(body)
        param = "response_format"
    if grammar is None:
        return None

    def make() -> Grammar:
        return Grammar(ll_tok, grammar, vocab_size, param)
    return make
