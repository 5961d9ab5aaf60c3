"""Magpie data for train-head: the user-turn prefix cut from the chat template, the prompt filter's reasons and
near-duplicate measure (hand-computed), and generation on a tiny model: records are the template of their
conversations, follow-ups carry the first answer, the manifest counts every seed, and a run resumed from its
chunks equals an uninterrupted one."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch
from conftest import EOS_ID, IM_END_ID
from engine_helpers import make_engine

from mtpserve.bench.workload import read_prompts_file
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.train.heldout import heldout_lines
from mtpserve.engine.train.magpie import MagpieConfig, MagpieGenerator, end_of_turn_ids, split_of, user_turn_prefix
from mtpserve.engine.train.mix import magpie_records, parse_mix, source_counts
from mtpserve.engine.train.prompt_filter import PromptFilter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_user_turn_prefix_and_end_of_turn(tiny_llama_dir):
    tok = make_engine(tiny_llama_dir, spec_draft_n_max=0).tokenizer
    before, after = user_turn_prefix(tok, [{"role": "system", "content": "Be brief."}])
    assert before == "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert after == "<|im_end|>\n"
    # the template's closing token joins the EOS tokens, even when the model's EOS is another one
    assert end_of_turn_ids(tok, {EOS_ID}) == sorted({EOS_ID, IM_END_ID})


def test_user_turn_prefix_smollm2(smollm2_checkpoint):
    """SmolLM2's template adds its default system prompt only when there is none."""
    tok = smollm2_checkpoint.tokenizer
    before, _ = user_turn_prefix(tok, [{"role": "system", "content": "S"}])
    assert before == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n"
    before, _ = user_turn_prefix(tok, [])
    assert before.endswith("trained by Hugging Face<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("text,finished,opener,reason", [
    ("How do I bake bread?", False, "", "unfinished"),
    ("Hi there", True, "", "too_short"),
    ("Why do cats", True, "Why do cats", "too_short"),  # nothing past the opener
    ("word " * 400, True, "", "too_long"),
    ("User: what is the capital of Peru?", True, "", "template"),
    ("What is <|im_start|> for in a template?", True, "", "template"),
    ("Sure! Here is a function that adds two numbers.", True, "", "assistant_voice"),
    ("1234 5678 999 + 42 = ?? (((( ))))", True, "", "not_text"),
    ("buy now buy now buy now buy now buy now please", True, "", "repetitive"),
    ("Write a Go function that merges two sorted slices.", True, "Write a Go function that", None),
])
def test_filter_reasons(text, finished, opener, reason):
    assert PromptFilter().reason(text, finished, opener) == reason


def test_filter_duplicates_by_word_trigrams():
    keep = PromptFilter(max_similarity=0.6)
    assert keep.keep("How do I bake sourdough bread at home today?")
    assert keep.reason("how do i bake sourdough bread at home today") == "duplicate"
    # 7 trigrams each, 6 shared: Jaccard 6 / (7 + 7 - 6) = 0.75
    near = "How do I bake sourdough bread at home quickly?"
    assert keep.reason(near) == "near_duplicate"
    assert keep.similarity(frozenset(["how do i", "do i bake", "x y z"])) == pytest.approx(2 / (3 + 7 - 2))
    assert keep.keep("What is the best way to learn the guitar as an adult?")
    assert keep.stats == {"kept": 2}


def test_parse_mix_and_counts():
    assert parse_mix("builtin=1,magpie=3") == {"builtin": 0.25, "magpie": 0.75}
    assert parse_mix("magpie=1,builtin=0") == {"magpie": 1.0}
    assert source_counts({"builtin": 0.25, "magpie": 0.75}, 10) == {"builtin": 2, "magpie": 8}
    for bad in ("web=1", "magpie", "magpie=x", "magpie=-1", "builtin=0"):
        with pytest.raises(Exception, match="prompt-mix"):
            parse_mix(bad)


class KeepFinished:
    """A filter that keeps every turn that ended by itself (a tiny random model writes no real prose)."""

    def reason(self, text, finished=True, opener=""):
        return None if finished else "unfinished"

    def add(self, text):
        pass


def _generate(model_dir, path, count):
    engine = make_engine(model_dir, spec_draft_n_max=0, dtype=torch.float64, max_num_seqs=8)
    cfg = MagpieConfig(round_size=6, max_user_tokens=40, max_answer_tokens=40, follow_up_share=1.0)
    gen = MagpieGenerator(engine, str(path), cfg)
    gen.first_filter = KeepFinished()
    gen.follow_filter = KeepFinished()
    gen.stop_ids = list(range(2, 40))  # a random model rarely samples its one end-of-turn token: turns end sooner
    return engine.tokenizer, gen, gen.generate(count)


def test_generation_records_and_manifest(tiny_llama_dir, tmp_path):
    tok, gen, records = _generate(tiny_llama_dir, tmp_path / "m", 12)
    assert len(records) == 12
    firsts = {}
    for r in records:
        if len(r["user"]) == 1:
            conv = [{"role": "user", "content": r["user"][0]}]
            expected = tok.encode(tok.apply_chat_template(conv), add_special_tokens=False)
            assert r["prompt_ids"] == expected
            firsts[r["user"][0]] = r
    follow_ups = [r for r in records if len(r["user"]) == 2]
    assert follow_ups, "follow_up_share=1: some answers that ended get a follow-up"
    for r in follow_ups:
        text = tok.decode(r["prompt_ids"], skip_special_tokens=False)
        first = firsts.get(r["user"][0])
        if first is not None:  # the first turn's answer is the assistant message of the follow-up's prompt
            assert tok.decode(first["output_ids"][:-1]) in text
        assert text.endswith(r["user"][1] + "<|im_end|>\n<|im_start|>assistant\n")
    manifest = json.load(open(tmp_path / "m" / "manifest.json"))
    for chunk in manifest["chunks"]:
        assert sum(chunk["filter"].values()) == 6  # every seed decided once
        with gzip.open(os.path.join(tmp_path / "m", chunk["file"]), "rt") as f:
            assert sum(1 for _ in f) == chunk["records"]


def test_heldout_prompts_rebuild_every_conversation(tiny_llama_dir, tmp_path):
    """Held-out Magpie records as bench prompts: the rebuilt conversation (a follow-up carries the first
    answer) encodes to each record's own prompt."""
    tok, _, records = _generate(tiny_llama_dir, tmp_path / "m", 12)
    lines = heldout_lines([], records, tok, 64)
    assert len(lines) == len(records) and any(len(line["messages"]) == 3 for line in lines)
    for line, r in zip(lines, records):
        assert line["kind"] == f"magpie-{r['kind']}" and line["max_tokens"] == 64
        assert tok.encode(tok.apply_chat_template(line["messages"]), add_special_tokens=False) == r["prompt_ids"]
    # a follow-up whose first turn is not among the records cannot be rebuilt, and is left out
    follow_ups = [r for r in records if len(r["user"]) == 2]
    assert heldout_lines([], follow_ups, tok, 64) == []


def test_resumed_generation_equals_uninterrupted(tiny_llama_dir, tmp_path):
    _, first, _ = _generate(tiny_llama_dir, tmp_path / "a", 5)
    rounds_before = first.store.num_rounds
    _, resumed, _ = _generate(tiny_llama_dir, tmp_path / "a", 12)
    _, straight, _ = _generate(tiny_llama_dir, tmp_path / "b", 12)
    assert resumed.store.num_rounds > rounds_before
    common = min(resumed.store.num_rounds, straight.store.num_rounds)
    assert common > rounds_before
    a = resumed.store.records()
    b = straight.store.records()
    count = sum(c["records"] for c in straight.store.manifest["chunks"][:common])
    assert count > 0 and a[:count] == b[:count]


def test_magpie_skip_passes_over_the_first_stored_conversations(tiny_llama_dir, tmp_path):
    """A later stage's records: with ``skip``, training and held-out records both come from the stored
    conversations after the first ``skip``, in order, and nothing is generated while enough are stored."""
    _, gen, _ = _generate(tiny_llama_dir, tmp_path / "m", 12)
    stored = gen.store.records()
    engine = make_engine(tiny_llama_dir, spec_draft_n_max=0, max_num_seqs=8)
    train, evals, manifest = magpie_records(engine, str(tmp_path / "m"), 2, 4, 0, gen.cfg, skip=4)
    later = stored[4:]
    assert train == [r for r in later if split_of(r) == "train"][:2]
    assert evals == [r for r in later if split_of(r) == "eval"][:4]
    assert not any(r in stored[:4] for r in train + evals)
    assert len(manifest["chunks"]) == gen.store.num_rounds


def test_a_store_copied_one_folder_too_deep_is_refused_not_generated_again(tmp_path):
    """Stored conversations copied into a subfolder of the store (``cp -r stored data/magpie`` where
    ``data/magpie`` existed): a clear error that says where they are, and nothing written or removed."""
    from mtpserve.engine.errors import MtpserveError
    from mtpserve.engine.train.magpie_store import MANIFEST, MagpieStore

    settings = {"seed": 1}
    inner = tmp_path / "magpie" / "model-seed-1"
    inner.mkdir(parents=True)
    (inner / MANIFEST).write_text(json.dumps({"format": "mtpserve-magpie", "settings": settings, "chunks": []}))
    with pytest.raises(MtpserveError, match="model-seed-1"):
        MagpieStore(str(tmp_path / "magpie"), settings)
    assert sorted(os.listdir(tmp_path / "magpie")) == ["model-seed-1"]
    assert os.listdir(inner) == [MANIFEST]
    for name in os.listdir(inner):
        os.replace(inner / name, tmp_path / "magpie" / name)
    assert MagpieStore(str(tmp_path / "magpie"), settings).num_rounds == 0
    assert MagpieStore(str(tmp_path / "fresh"), settings).num_rounds == 0


class DropAll(KeepFinished):
    def reason(self, text, finished=True, opener=""):
        return "too_short"


def test_a_model_that_writes_no_usable_turns_stops_with_a_clear_error(tiny_llama_dir, tmp_path):
    from mtpserve.engine.errors import MtpserveError

    engine = make_engine(tiny_llama_dir, spec_draft_n_max=0, max_num_seqs=8)
    gen = MagpieGenerator(engine, str(tmp_path / "m"), MagpieConfig(round_size=4, max_user_tokens=8))
    gen.first_filter = DropAll()
    with pytest.raises(MtpserveError, match="builtin=1"):
        gen.generate(10)
    assert gen.store.num_rounds >= 8


def test_train_head_with_the_magpie_source_and_resume(tiny_llama_dir, tmp_path, monkeypatch):
    """The whole recipe with half its answers from Magpie: the report counts each source, evaluates each held-out
    set, and a rerun resumes every phase (the generated data is reused, not regenerated)."""
    from mtpserve.engine.train import magpie
    from mtpserve.engine.train.trainer import HeadTrainer, TrainConfig

    monkeypatch.setattr(magpie, "PromptFilter", KeepFinished)
    monkeypatch.setattr(magpie, "end_of_turn_ids", lambda tok, eos: list(range(2, 40)))
    cfg = TrainConfig(out=str(tmp_path / "h"), depth=2, draft_vocab=100, epochs=1, tokens_per_step=512,
                      prompt_mix={"builtin": 0.5, "magpie": 0.5}, train_answers=24, eval_per_kind=1, eval_magpie=4,
                      train_per_kind={"code": 6, "chat": 6, "json": 6, "math": 6}, eval_every=4, checkpoint_every=4,
                      max_num_seqs=8)
    report = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg).run()
    assert report["data"]["wanted"] == {"builtin": 12, "magpie": 12}
    assert report["data"]["train"]["magpie"] == 12 and 0 < report["data"]["train"]["builtin"] <= 12
    assert report["data"]["magpie"]["records"] >= 12
    assert set(report["eval"]["by_source"]) == {"builtin", "magpie"}
    assert report["sessions"] == 1
    manifest = json.load(open(tmp_path / "h" / "data" / "magpie" / "manifest.json"))
    # the held-out records as a bench prompts file: every prompt encodes to its held-out record's prompt
    tok = load_checkpoint(tiny_llama_dir).tokenizer
    prompts = read_prompts_file(str(tmp_path / "h" / "data" / "heldout.jsonl"))
    builtin = [json.loads(line)["prompt_ids"] for line in open(tmp_path / "h" / "data" / "eval.jsonl")]
    assert builtin and [p.token_ids(tok) for p in prompts if p.kind.startswith("builtin-")] == builtin
    magpie_lines = [p for p in prompts if p.kind.startswith("magpie-")]
    assert len(magpie_lines) == report["eval_sequences"]["magpie"]
    again = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg).run()
    assert again["resumed"] and again["sessions"] == 2 and again["steps"] == report["steps"]
    assert json.load(open(tmp_path / "h" / "data" / "magpie" / "manifest.json")) == manifest
    assert again["train_tokens"] == report["train_tokens"]
