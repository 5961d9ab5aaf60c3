"""Grammar-aware drafting in the engine (float64, a tiny model with a random MTP head): the output under a
grammar is the same with MTP on and off, it follows the grammar, drafts are made and accepted, and no draft the
grammar forbids is ever verified (counted by each request's grammar)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import make_engine
from mtp_helpers import save_random_head

from mtpserve.engine.grammar import (
    Grammar,
    json_schema_grammar,
    lark_grammar,
    ll_tokenizer,
    mask_logits,
)
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.mtp_head import save_mtp_head
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.spec.stats import SpecStats
from mtpserve.engine.train.head_init import head_config, init_head_weights
from mtpserve.server.tool_grammar import lit, tool_call_grammar
from mtpserve.server.tool_parsers import FORMATS

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["b", "c", "n", "t"],
          "properties": {"b": {"type": "boolean"}, "c": {"enum": ["red", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "t": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 1}}}
TOOLS = {"add": {"name": "add", "parameters": {
    "type": "object", "required": ["x", "y"], "additionalProperties": False,
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "boolean"}}}}}
PROMPTS = [[7, 30, 41, 9], [100, 12], [55, 66, 77, 88, 99, 5]]


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tmp_path_factory):
    config = load_checkpoint(tiny_llama_dir).config
    head = save_random_head(tmp_path_factory.mktemp("head"), config)
    plain = make_engine(tiny_llama_dir, dtype=torch.float64, spec_draft_n_max=0)
    mtp = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=head, spec_draft_n_max=3, spec_adaptive=False)
    return plain, mtp


def run(engine, grammar: str, **params) -> tuple[list[list[int]], list[Grammar]]:
    vocab = engine.model_config.vocab_size
    tok = ll_tokenizer(engine.tokenizer, vocab, engine.eos_token_ids)
    grammars = [Grammar(tok, grammar, vocab) for _ in PROMPTS]
    sampling = [SamplingParams(max_tokens=120, grammar=g, **params) for g in grammars]
    reqs = engine.generate(PROMPTS, sampling)
    assert all(r.finish_reason == "stop" for r in reqs)  # the grammar ended each answer
    return [r.output_token_ids for r in reqs], grammars


def check_schema(value: dict) -> None:
    """SCHEMA checked by hand."""
    assert set(value) == {"b", "c", "n", "t"} and isinstance(value["b"], bool)
    assert value["c"] in ("red", "blue") and 0 <= value["n"] <= 99
    assert len(value["t"]) <= 1 and set(value["t"]) <= {"x", "y"}


def check_drafting(engine, grammars: list[Grammar], before) -> None:
    """Drafts were verified under every grammar, some accepted, none forbidden."""
    stats = engine.spec_stats
    assert stats.num_draft_tokens > before.num_draft_tokens
    assert stats.num_accepted_tokens > before.num_accepted_tokens
    assert all(g.num_verified_drafts > 0 for g in grammars)
    assert [g.num_forbidden_drafts for g in grammars] == [0] * len(grammars)


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 1.0, "seed": 5}],
                         ids=["greedy", "seeded"])
def test_schema_output_same_with_mtp_on_and_off(engines, params):
    plain, mtp = engines
    grammar = json_schema_grammar(SCHEMA)
    expected, _ = run(plain, grammar, **params)
    before = mtp.spec_stats.copy()
    outputs, grammars = run(mtp, grammar, **params)
    assert outputs == expected
    for ids in outputs:
        check_schema(json.loads(mtp.tokenizer.decode(ids)))
    check_drafting(mtp, grammars, before)


def test_forced_tool_call_same_with_mtp_on_and_off(engines):
    plain, mtp = engines
    grammar = lark_grammar(tool_call_grammar("hermes", TOOLS, None, False, lit))
    expected, _ = run(plain, grammar, temperature=0)
    before = mtp.spec_stats.copy()
    outputs, grammars = run(mtp, grammar, temperature=0)
    assert outputs == expected
    hermes = FORMATS["hermes"]
    for ids in outputs:
        text = mtp.tokenizer.decode(ids)
        call = hermes.parse_call(text.removesuffix("</tool_call>"), TOOLS)
        arguments = json.loads(call.arguments)
        assert call.name == "add" and 0 <= arguments["x"] <= 9 and isinstance(arguments["y"], bool)
    check_drafting(mtp, grammars, before)


def test_reduced_draft_vocabulary_drafts_nothing_forbidden(engines, tiny_llama_dir, tmp_path):
    """A head that may draft only half the vocabulary often has no token the grammar allows: the drafts are
    cut there instead of proposing a forbidden one."""
    plain, _ = engines
    config = load_checkpoint(tiny_llama_dir).config
    head = str(tmp_path / "half")
    save_mtp_head(head, init_head_weights(config, 1, 0, 0.1), head_config(config, 1), draft_vocab=torch.arange(150))
    mtp = make_engine(tiny_llama_dir, dtype=torch.float64, mtp_head=head, spec_draft_n_max=3, spec_adaptive=False)
    grammar = json_schema_grammar(SCHEMA)
    expected, _ = run(plain, grammar, temperature=0)
    outputs, grammars = run(mtp, grammar, temperature=0)
    assert outputs == expected
    check_drafting(mtp, grammars, SpecStats())


def test_a_forced_token_outside_the_draft_vocabulary_is_drafted():
    """Rows of draft logits (-inf outside a reduced draft vocabulary) under a grammar's masks."""
    inf = float("-inf")
    logits = torch.tensor([[1.0, 2.0, inf, inf]] * 4)
    allowed = torch.tensor([[True, False, False, False],   # allowed and drafted: kept
                            [False, False, True, False],   # forced, not in the draft vocabulary
                            [False, False, True, True],    # two allowed, neither drafted
                            [False, False, False, False]])  # nothing allowed
    masked = mask_logits(logits, allowed)
    assert masked[0].tolist() == [1.0, inf, inf, inf]
    assert masked[1].tolist() == [inf, inf, 0.0, inf]
    assert masked[2].tolist() == logits[2].tolist() and masked[3].tolist() == logits[3].tolist()
    # target logits are finite everywhere: the allowed tokens only
    assert mask_logits(torch.zeros(1, 4), allowed[2:3]).tolist() == [[inf, inf, 0.0, 0.0]]


def test_a_forbidden_draft_is_counted(engines):
    """The counter can fail: a draft the grammar does not allow, verified, is counted with those after it."""
    _, mtp = engines
    vocab = mtp.model_config.vocab_size
    tok = ll_tokenizer(mtp.tokenizer, vocab, mtp.eos_token_ids)
    grammar = Grammar(tok, json_schema_grammar(SCHEMA), vocab)
    brace = mtp.tokenizer.encode("{", add_special_tokens=False)
    letter = mtp.tokenizer.encode("x", add_special_tokens=False)
    masks = grammar.verify_masks([], brace + letter + letter)
    assert masks.shape == (4, vocab) and masks[0, brace[0]] and not masks[1, letter[0]]
    assert (grammar.num_verified_drafts, grammar.num_forbidden_drafts) == (3, 2)
    # an end of answer the grammar allows is not forbidden, and nothing after it is verified
    empty = Grammar(tok, json_schema_grammar({"type": "object"}), vocab)
    pair = mtp.tokenizer.encode("{}", add_special_tokens=False)
    eos = min(mtp.eos_token_ids)
    empty.verify_masks([], pair + [eos] + letter)
    empty.verify_masks(pair, [eos] + letter)
    assert (empty.num_verified_drafts, empty.num_forbidden_drafts) == (len(pair) + 2, 0)


def test_verify_reuses_the_masks_drafting_computed(engines, monkeypatch):
    """The verify step's rows after the output and each draft prefix are the masks the draft steps
    computed for the same prefixes: taken from them (one matcher fill, for the bonus row), and
    equal to the masks a fresh matcher computes."""
    from mtpserve.engine import grammar

    _, mtp = engines
    vocab = mtp.model_config.vocab_size
    tok = ll_tokenizer(mtp.tokenizer, vocab, mtp.eos_token_ids)
    output = mtp.tokenizer.encode('{"b": true, ', add_special_tokens=False)
    drafts = mtp.tokenizer.encode('"c": "red"', add_special_tokens=False)[:3]
    fresh = Grammar(tok, json_schema_grammar(SCHEMA), vocab)
    want = fresh.verify_masks(output, drafts)
    drafting = Grammar(tok, json_schema_grammar(SCHEMA), vocab)
    for j in range(len(drafts)):
        drafting.next_mask(output, drafts[:j])
    fills = []
    real_fill = grammar.fill_bitmask
    monkeypatch.setattr(grammar, "fill_bitmask",
                        lambda *args: fills.append(1) or real_fill(*args))
    got = drafting.verify_masks(output, drafts)
    assert torch.equal(got, want)
    assert len(fills) == 1
    # a later output drops them: every row from the matcher again
    fills.clear()
    drafting.verify_masks(output + drafts[:1], drafts[1:])
    assert len(fills) == len(drafts)


def accepts(grammar: Grammar, tokenizer, text: str) -> bool:
    """Whether ``grammar`` takes ``text`` whole and may end there."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return grammar.matcher.try_consume_tokens(ids) == len(ids) and grammar.matcher.is_accepting()


@pytest.mark.parametrize(("text", "ok"), [
    ('{"a": [1, 2], "b": "x"}', True),  # one line
    ('{\n    "a": [\n        1,\n        2\n    ],\n    "b": "x"\n}', True),  # indented
    ('{\n' + " " * 32 + '"a": [1], "b": "x"}', True),  # the longest indentation allowed
    ('{\n' + " " * 33 + '"a": [1], "b": "x"}', False),
    ('{\n\n    "a": [1], "b": "x"}', False),  # no blank lines: a small model could loop on them
    ('{  "a": [1], "b": "x"}', False),
])
def test_json_is_written_as_models_write_it_with_whitespace_bounded(engines, text, ok):
    _, mtp = engines
    vocab = mtp.model_config.vocab_size
    tok = ll_tokenizer(mtp.tokenizer, vocab, mtp.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}},
                                               "b": {"type": "string"}}}
    assert accepts(Grammar(tok, json_schema_grammar(schema), vocab), mtp.tokenizer, text) is ok
