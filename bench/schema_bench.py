"""The ``schema`` section of ``mtpserve bench``: greedy decode of the built-in prompts that ask for a
JSON object, free (no ``response_format``), under ``json_object`` and under a ``json_schema``
written for the prompt, each with MTP off and on (modes alternating run by run). Per constraint
and mode: decode tok/s and its ratio to MTP off under the same constraint, acceptance rate, tokens
per drafting step, how many answers parse as JSON, and the drafts the grammar forbids that reached
verification (0 with grammar-aware drafting)."""

from __future__ import annotations

import json

from mtpserve.bench.engine_runs import OFF, DecodeRun, EngineRuns, Mode, merged_acceptance, tok_s
from mtpserve.bench.stats import mean_std
from mtpserve.bench.workload import BenchPrompt, load_prompts
from mtpserve.engine.grammar import Grammar, json_schema_grammar, ll_tokenizer
from mtpserve.engine.sampling_params import SamplingParams

CONSTRAINTS = ("none", "json_object", "json_schema")
STRING = {"type": "string"}
# the keys the built-in JSON prompts ask for (engine/train/prompts.py)
MODULE_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "purpose", "common_functions"],
    "properties": {"name": STRING, "purpose": STRING,
                   "common_functions": {"type": "array", "items": STRING}}}
FUNCTION_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "module", "arguments", "summary"],
    "properties": {"name": STRING, "module": STRING, "summary": STRING,
                   "arguments": {"type": "array", "items": {
                       "type": "object", "additionalProperties": False,
                       "required": ["name", "default"],
                       "properties": {"name": STRING, "default": {}}}}}}


def schema_for(prompt: BenchPrompt) -> dict | None:
    """The schema of the answer ``prompt`` asks for (its own, from a prompts file, or that of a
    built-in JSON prompt); None for a prompt that asks for no JSON."""
    if prompt.schema is not None:
        return prompt.schema
    text = prompt.text
    if text.startswith("Describe the Python module"):
        return MODULE_SCHEMA
    if text.startswith("Return a JSON object describing the function"):
        return FUNCTION_SCHEMA
    return None


def json_prompts(count: int | None, max_tokens: int | None,
                 path: str | None = None) -> list[BenchPrompt]:
    """The first ``count`` (None: all) prompts that ask for a JSON object: those of the prompts
    file ``path`` that carry a "schema", or the built-in eval prompts of kind json."""
    kinds = ["json"]
    if path:
        kinds = None
    prompts = load_prompts(path, kinds, None, max_tokens)
    return [p for p in prompts if schema_for(p) is not None][:count]


def skip_without_schemas(sections: list[str], path: str | None) -> dict | None:
    """Drop the "schema" section when the prompts file ``path`` has no line with a "schema"; what
    the results say in its place."""
    if "schema" not in sections or not path:
        return None
    if json_prompts(None, None, path):
        return None
    sections.remove("schema")
    return {"skipped": f'no line of {path} carries a "schema"'}


def grammar_text(constraint: str, prompt: BenchPrompt) -> str | None:
    if constraint == "none":
        return None
    if constraint == "json_object":
        return json_schema_grammar({"type": "object"})
    return json_schema_grammar(schema_for(prompt))


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Record:
    """One run: its decode, whether the answer parsed, and its grammar's draft counts."""

    def __init__(self, constraint: str, run: DecodeRun, parsed: bool, grammar: Grammar | None):
        self.constraint = constraint
        self.run = run
        self.parsed = parsed
        self.verified_drafts = 0
        self.forbidden_drafts = 0
        if grammar is not None:
            self.verified_drafts = grammar.num_verified_drafts
            self.forbidden_drafts = grammar.num_forbidden_drafts


def measure(runs: EngineRuns, prompts: list[BenchPrompt], modes: list[Mode],
            repeats: int) -> list[dict]:
    """One row per constraint and mode."""
    engine = runs.engine
    vocab_size = engine.model_config.vocab_size
    ll_tok = ll_tokenizer(engine.tokenizer, vocab_size, engine.eos_token_ids)
    records = []
    for rep in range(repeats):
        for p in prompts:
            ids = p.token_ids(engine.tokenizer)
            for constraint in CONSTRAINTS:
                text = grammar_text(constraint, p)
                for mode in modes:
                    grammar = None
                    if text is not None:
                        grammar = Grammar(ll_tok, text, vocab_size)
                    params = SamplingParams(max_tokens=p.max_tokens, temperature=0,
                                            grammar=grammar)
                    (req,), _ = runs.run([ids], [params], mode)
                    decoded = max(len(req.output_token_ids) - 1, 0)
                    seconds = req.timings()["decode_ms"] / 1000
                    run = DecodeRun(mode.name, rep, p.kind, decoded, seconds, req.spec_stats)
                    answer = engine.tokenizer.decode(req.output_token_ids)
                    records.append(Record(constraint, run, parses(answer), grammar))
    rows = []
    for constraint in CONSTRAINTS:
        mine = [r for r in records if r.constraint == constraint]
        base = per_repeat(mine, OFF.name, repeats)
        for mode in modes:
            of_mode = [r for r in mine if r.run.mode == mode.name]
            speeds = per_repeat(mine, mode.name, repeats)
            rows.append({
                "constraint": constraint,
                "mode": mode.name,
                "k": mode.spec_n_max,
                "adaptive": mode.adaptive,
                "tok_s": mean_std(speeds),
                "speedup": mean_std([a / b if b else 0.0 for a, b in zip(speeds, base)]),
                "decoded_tokens": sum(r.run.decoded for r in of_mode),
                "acceptance": merged_acceptance([r.run for r in of_mode]),
                "answers": len(of_mode),
                "parsed": sum(r.parsed for r in of_mode),
                "verified_drafts": sum(r.verified_drafts for r in of_mode),
                "forbidden_drafts": sum(r.forbidden_drafts for r in of_mode),
            })
    return rows


def per_repeat(records: list[Record], mode: str, repeats: int) -> list[float]:
    """Decode tok/s of ``mode``'s runs, one value per repeat."""
    speeds = []
    for rep in range(repeats):
        speeds.append(tok_s([r.run for r in records if r.run.mode == mode and r.run.repeat == rep]))
    return speeds
