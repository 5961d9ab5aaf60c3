"""The bench's schema section on a tiny model with a random head: JSON prompts found, a row per constraint and
mode, grammar answers with drafts verified and none forbidden, and the summary table."""

from __future__ import annotations

import json
import os

import pytest
import torch
from engine_helpers import make_engine
from mtp_helpers import save_random_head

from mtpserve.bench import schema_bench
from mtpserve.bench.engine_runs import OFF, EngineRuns, fixed
from mtpserve.bench.summary import schema_section
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.grammar import json_schema_grammar
from mtpserve.engine.loader import load_checkpoint

HAND_PROMPTS = os.path.join(os.path.dirname(__file__), "..", "bench", "prompts", "eval_hand.jsonl")


class Progress:
    def update(self, n: int = 1) -> None:
        pass


def test_schema_section_rows(tiny_llama_dir, tmp_path):
    prompts = schema_bench.json_prompts(2, 12)
    assert len(prompts) == 2 and all(p.kind == "json" and p.max_tokens == 12 for p in prompts)
    assert {json.dumps(schema_bench.schema_for(p)) for p in prompts} <= {
        json.dumps(schema_bench.MODULE_SCHEMA), json.dumps(schema_bench.FUNCTION_SCHEMA)}
    head = save_random_head(tmp_path / "head", load_checkpoint(tiny_llama_dir).config)
    engine = make_engine(tiny_llama_dir, mtp_head=head, spec_draft_n_max=2, spec_adaptive=False,
                         dtype=torch.float64)
    rows = schema_bench.measure(EngineRuns(engine, Progress()), prompts[:1], [OFF, fixed(2)], 1)
    assert [(r["constraint"], r["mode"]) for r in rows] == [
        ("none", "off"), ("none", "k=2"), ("json_object", "off"), ("json_object", "k=2"),
        ("json_schema", "off"), ("json_schema", "k=2")]
    schema_on = rows[5]
    assert schema_on["acceptance"]["num_drafts"] > 0 and schema_on["verified_drafts"] > 0
    assert all(r["forbidden_drafts"] == 0 for r in rows)
    assert rows[4]["decoded_tokens"] == schema_on["decoded_tokens"]  # greedy: the same answer
    assert all(r["answers"] == 1 and r["tok_s"]["mean"] > 0 for r in rows)
    lines = schema_section(rows)
    assert lines[0] == "## JSON prompts with and without a schema (greedy)"
    assert any(line.startswith("| json_schema | k=2 |") and line.endswith(f" of {schema_on['verified_drafts']} |")
               for line in lines)


def test_schema_prompts_from_a_file(tmp_path):
    """A prompts file's lines with a "schema" are the section's prompts, each with its own schema."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    path = tmp_path / "prompts.jsonl"
    lines = [{"kind": "chat", "prompt": "Say hi."},
             {"kind": "json", "prompt": "A city as JSON.", "max_tokens": 40, "schema": schema}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompts = schema_bench.json_prompts(5, 32, str(path))
    assert [(p.text, p.max_tokens, schema_bench.schema_for(p)) for p in prompts] == [
        ("A city as JSON.", 32, schema)]
    sections = ["decode", "schema"]
    assert schema_bench.skip_without_schemas(sections, str(path)) is None and sections == ["decode", "schema"]
    path.write_text(json.dumps(lines[0]) + "\n")
    skipped = schema_bench.skip_without_schemas(sections, str(path))
    assert sections == ["decode"] and 'carries a "schema"' in skipped["skipped"]
    assert schema_section(skipped)[0].startswith("JSON prompts with and without a schema skipped: no line of")
    path.write_text(json.dumps({**lines[1], "schema": ["not", "a", "schema"]}) + "\n")
    with pytest.raises(MtpserveError, match='"schema" must be a JSON schema object'):
        schema_bench.json_prompts(5, None, str(path))


def test_every_hand_written_schema_compiles():
    prompts = schema_bench.json_prompts(100, None, HAND_PROMPTS)
    assert len(prompts) == 15
    for p in prompts:
        json_schema_grammar(p.schema)  # raises on a schema llguidance cannot compile
