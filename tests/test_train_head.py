"""train-head: the teacher-forced draft chain equals what the engine drafts, training raises acceptance, the
reduced draft vocabulary stays lossless, and a rerun resumes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import replace

import pytest
import torch
from engine_helpers import greedy, make_engine
from mtp_helpers import save_random_head

from mtpserve.cli.main import main
from mtpserve.cli.train_head import parse_per_kind
from mtpserve.engine.errors import MtpserveError
from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.loader.mtp_head import load_mtp_head
from mtpserve.engine.sampling_params import SamplingParams
from mtpserve.engine.train import trainer as trainer_module
from mtpserve.engine.train.distill import base_hidden, chain_logits, pack
from mtpserve.engine.train.trainer import HeadTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _record_draft_logits(engine):
    """Wrap the MTP head so every draft step's logits are kept (``draft_logits``: every draft path computes them
    there, once a step)."""
    seen = []
    original = engine.mtp.draft_logits

    def recording(step, y):
        out = original(step, y)
        seen.append((step, out.clone()))
        return out

    engine.mtp.draft_logits = recording
    return seen


@pytest.mark.parametrize("staircase", [True, False])
def test_teacher_forced_chain_equals_engine_drafts(tiny_llama_dir, tmp_path, staircase):
    """The draft logits of the engine's first chain after a prompt (paged KV, step-by-step drafting) equal the
    training pass over the same tokens; attention without the draft-chain keys (plain causal per depth) does not."""
    config = load_checkpoint(tiny_llama_dir).config
    head = save_random_head(tmp_path / "head", config, scale=0.2)
    engine = make_engine(tiny_llama_dir, mtp_head=head, spec_draft_n_max=3, spec_adaptive=False,
                         dtype=torch.float64)
    seen = _record_draft_logits(engine)
    prompt = torch.randint(5, config.vocab_size, (23,), generator=torch.Generator().manual_seed(3)).tolist()
    req = engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()  # prefill: emits g, then drafts d1..d3 from the chain starting at the last prompt position
    assert [s for s, _ in seen] == [0, 1, 2]
    engine_steps = list(seen)  # chain_logits below goes through the same recorded draft_logits
    drafts = req.spec_token_ids
    ids = prompt + req.output_token_ids[:1] + drafts
    hidden = base_hidden(engine.model, torch.tensor(ids))
    batch = pack([(ids, 0)], [hidden], 3, None, "cpu")
    row = len(prompt) - 1
    with torch.no_grad():
        if not staircase:
            engine.mtp.layers.append(engine.mtp.layers[0])  # two "layers": plain causal attention per depth
        ours = chain_logits(engine.mtp, batch, 3)
    for s, (_, logits) in enumerate(engine_steps):
        same = torch.allclose(ours[s][row], logits[0], atol=1e-9, rtol=1e-9)
        assert same or (not staircase and s > 0), f"depth {s}"
        if not staircase and s > 0:
            assert not same, "the control must differ, or the comparison has no power"


def test_parse_per_kind():
    assert parse_per_kind("code=all,math=5") == {"code": None, "math": 5}
    for bad in ("code", "poems=3", "math=-1", "math=x"):
        with pytest.raises(Exception, match="train-per-kind"):
            parse_per_kind(bad)


def _mean_acceptance(engine, prompts) -> float:
    engine.spec_stats = type(engine.spec_stats)()
    greedy(engine, prompts, 32)
    return engine.spec_stats.mean_acceptance_length


def test_train_head_raises_acceptance_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "head")
    cfg = TrainConfig(out=out, depth=3, draft_vocab=200, epochs=2, tokens_per_step=512, eval_per_kind=4,
                      prompt_mix={"builtin": 1.0}, train_answers=48,
                      train_per_kind={"code": 24, "chat": 8, "json": 8, "math": 8}, eval_every=10,
                      checkpoint_every=10, max_num_seqs=16)
    report = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg).run()
    assert report["loss_last"] < report["loss_first"]
    before, after = report["eval_before"], report["eval"]
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.1
    assert after["acceptance_per_position"][0] > before["acceptance_per_position"][0]
    # the head loads, carries its draft vocabulary, and the engine drafts only from it
    config = load_checkpoint(tiny_llama_dir).config
    _, head = load_mtp_head(out, config)
    vocab = set(head["draft_token_ids"].tolist())
    assert len(vocab) == 200
    trained = make_engine(tiny_llama_dir, mtp_head=out, spec_draft_n_max=3, spec_adaptive=False)
    drafted = []
    original = trained.mtp.vocab_ids  # every draft's token id comes from here
    trained.mtp.vocab_ids = lambda columns: _keep(drafted, original(columns))
    data = [json.loads(line) for line in open(os.path.join(out, "data", "eval.jsonl"), encoding="utf-8")]
    prompts = [d["prompt_ids"] for d in data]
    untrained = make_engine(tiny_llama_dir, mtp_head=save_random_head(tmp_path / "r", config), spec_draft_n_max=3,
                            spec_adaptive=False)
    assert _mean_acceptance(trained, prompts) > _mean_acceptance(untrained, prompts) + 0.1
    assert drafted and set(torch.cat(drafted).tolist()) <= vocab
    # a rerun finds the finished run and resumes instead of starting over, with the saved hidden states
    trainer = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg)
    computed = []
    real_hidden = trainer_module.base_hidden
    def counted(model, ids):
        computed.append(ids)
        return real_hidden(model, ids)
    monkeypatch.setattr(trainer_module, "base_hidden", counted)
    again = trainer.run()
    assert again["resumed"] and again["steps"] == report["steps"]
    assert computed == []
    # a changed record is not served the saved states: only it is computed, the others are reused
    records = [json.loads(line) for line in open(os.path.join(out, "data", "eval.jsonl"), encoding="utf-8")]
    saved = trainer.hidden(records, "eval-builtin")
    records[0]["output_ids"] = records[0]["output_ids"][:-1]
    hidden = trainer.hidden(records, "eval-builtin")
    assert len(computed) == 1 and computed[0].tolist() == records[0]["prompt_ids"] + records[0]["output_ids"]
    assert hidden[0].shape[0] == saved[0].shape[0] - 1
    assert all(torch.equal(a, b) for a, b in zip(hidden[1:], saved[1:]))
    # the new record's states were saved: a fresh trainer computes nothing
    reloaded = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg).hidden(records, "eval-builtin")
    assert len(computed) == 1 and torch.equal(reloaded[0], hidden[0])
    # --init-head: a new run on a copy of the data starts where the trained head ended, not from random weights
    warm_out = str(tmp_path / "warm")
    shutil.copytree(os.path.join(out, "data"), os.path.join(warm_out, "data"))
    monkeypatch.setattr(trainer_module, "base_hidden", real_hidden)
    argv = ["train-head", "--model", str(tiny_llama_dir), "--out", warm_out, "--init-head", out, "--epochs", "1",
            "--depth", "3", "--draft-vocab", "200", "--tokens-per-step", "512", "--eval-per-kind", "4",
            "--prompt-mix", "builtin=1", "--train-answers", "48", "--train-per-kind", "code=24,chat=8,json=8,math=8",
            "--eval-every", "10", "--checkpoint-every", "10", "--max-num-seqs", "16", "--device", "cpu"]
    assert main(argv) == 0
    warm = json.load(open(os.path.join(warm_out, "train_report.json"), encoding="utf-8"))
    assert not warm["resumed"]
    assert warm["eval_before"]["mean_acceptance_length"] == pytest.approx(after["mean_acceptance_length"], abs=0.02)
    # the report names its command and hardware, and carries the report of the head it started from
    assert warm["command"] == "mtpserve " + shlex.join(argv)
    assert "PyTorch" in warm["hardware"] and report["command"] is None
    assert warm["init_head_report"]["steps"] == report["steps"]
    assert warm["init_head_report"]["eval"]["mean_acceptance_length"] == after["mean_acceptance_length"]
    with pytest.raises(MtpserveError, match="holds a head of 1 layer"):
        HeadTrainer(load_checkpoint(tiny_llama_dir), replace(cfg, out=str(tmp_path / "two"), num_layers=2,
                                                             init_head=out)).run()


def test_answers_come_from_the_quantized_model_when_asked(tiny_llama_dir, tmp_path):
    """generate_quantization="int4": the prompts are answered by the int4 model (as `serve` runs it on a
    CPU), the hidden states and the training stay on float weights."""
    cfg = TrainConfig(out=str(tmp_path / "q"), depth=2, draft_vocab=100, epochs=1, tokens_per_step=512,
                      eval_per_kind=2, prompt_mix={"builtin": 1.0}, train_answers=8,
                      train_per_kind={"code": 2, "chat": 2, "json": 2, "math": 2}, max_num_seqs=8,
                      generate_quantization="int4")
    with pytest.raises(MtpserveError, match="both or neither"):
        HeadTrainer(load_checkpoint(tiny_llama_dir), cfg)
    trainer = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg, load_checkpoint(tiny_llama_dir, quantized=True))
    assert trainer.generator is not trainer.engine and trainer.generator.config.quantization == "int4"
    report = trainer.run()
    assert report["config"]["generate_quantization"] == "int4" and report["steps"] > 0
    data = [json.loads(line) for line in open(os.path.join(cfg.out, "data", "train.jsonl"), encoding="utf-8")]
    prompts = [d["prompt_ids"] for d in data]
    params = [SamplingParams(max_tokens=len(d["output_ids"]), temperature=0) for d in data]
    # the trainer's block size: the attention's order of sums follows the cache blocks
    int4 = make_engine(tiny_llama_dir, quantization="int4", spec_draft_n_max=0, block_size=16)
    exact = make_engine(tiny_llama_dir, spec_draft_n_max=0, block_size=16)
    answers = [d["output_ids"] for d in data]
    assert [r.output_token_ids for r in int4.generate(prompts, params)] == answers
    assert [r.output_token_ids for r in exact.generate(prompts, params)] != answers


def _keep(store, tokens):
    store.append(tokens)
    return tokens


def test_draft_vocab_is_lossless_greedy_and_sampled(tiny_llama_dir, tmp_path):
    """A head restricted to a few tokens: greedy output equals plain decoding (float64), and seeded sampling
    with rejection against q = 0 outside the subset repeats exactly."""
    from mtpserve.engine.loader.mtp_head import save_mtp_head
    from mtpserve.engine.train.head_init import head_config

    config = load_checkpoint(tiny_llama_dir).config
    src = save_random_head(tmp_path / "src", config, scale=0.05)
    weights, _ = load_mtp_head(src, config)
    subset = torch.arange(5, config.vocab_size, 3)
    save_mtp_head(str(tmp_path / "sub"), weights, head_config(config, 1), subset)
    prompts = [torch.randint(5, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 11, 30)]
    plain = make_engine(tiny_llama_dir, spec_draft_n_max=0, dtype=torch.float64)
    spec = make_engine(tiny_llama_dir, mtp_head=str(tmp_path / "sub"), spec_draft_n_max=3, spec_adaptive=False,
                       dtype=torch.float64)
    assert greedy(spec, prompts, 24) == greedy(plain, prompts, 24)
    assert spec.spec_stats.num_draft_tokens > 0
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=24, seed=5, ignore_eos=True)
    runs = [[r.output_token_ids for r in spec.generate(prompts, params)] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("args,message", [
    (["--prompt-mix", "web=1"], "--prompt-mix"),
    (["--prompt-mix", "builtin=0,magpie=0"], "positive share"),
    (["--train-answers", "0"], "--train-answers"),
    (["--magpie-skip", "-1"], "--magpie-skip"),
    (["--magpie-skip", "10", "--prompt-mix", "builtin=1"], "--magpie-skip needs a magpie share"),
    (["--distill-temperature", "0"], "--distill-temperature"),
    (["--init-head", "no/such/head"], "--init-head no/such/head: no such head directory"),
])
def test_train_head_cli_rejects_bad_options(capsys, tmp_path, args, message):
    from mtpserve.cli.main import main

    code = main(["train-head", "--out", str(tmp_path / "h"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
