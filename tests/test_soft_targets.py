"""Soft targets for train-head: each draft row's teacher is the base model's next-token distribution at the
right position (checked against transformers), the loss is T^2 KL(p_T || q_T), and soft-target training lowers
the KL and raises acceptance on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import make_engine

from mtpserve.engine.loader import load_checkpoint
from mtpserve.engine.train.distill import base_hidden, pack
from mtpserve.engine.train.soft_targets import Teacher, distribution_sums, soft_loss, teacher_head
from mtpserve.engine.train.trainer import HeadTrainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_rows_are_the_base_models_next_token_logits(tiny_llama_dir):
    transformers = pytest.importorskip("transformers")
    engine = make_engine(tiny_llama_dir, spec_draft_n_max=0, dtype=torch.float64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    vocab_size = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(5, vocab_size, (n,), generator=g).tolist(), start) for n, start in ((13, 4), (9, 2))]
    vocab = torch.arange(0, vocab_size, 3)
    hidden = [base_hidden(engine.model, torch.tensor(ids)) for ids, _ in seqs]
    batch = pack(seqs, hidden, 3, None, "cpu")
    teacher = Teacher(teacher_head(engine.model, vocab)).logits(batch)
    offset = 0
    checked = 0
    for ids, _ in seqs:
        with torch.no_grad():
            reference = hf(torch.tensor([ids])).logits[0][:, vocab]
        for s in range(3):
            for i in range(len(ids)):
                row = offset + i
                if batch["counted"][s][row]:
                    # row i at depth s predicts token i + 2 + s: the base model's logits at position i + 1 + s
                    got = teacher[batch["teacher_rows"][s][row]]
                    torch.testing.assert_close(got, reference[i + 1 + s].float(), atol=1e-5, rtol=1e-5)
                    checked += 1
        offset += len(ids)
    assert checked == sum(len(ids) - max(start, 2 + s) for ids, start in seqs for s in range(3))


def _batch(rows: int, hidden_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    counted = torch.rand(rows, generator=g) < 0.7
    return {"hidden": torch.randn(rows, hidden_size, generator=g, dtype=torch.float64),
            "counted": [counted], "teacher_rows": [torch.randint(rows, (rows,), generator=g)]}


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_soft_loss_is_scaled_kl_at_the_temperature(temperature):
    batch = _batch(40, 8, 1)
    head = torch.randn(8, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    teacher = Teacher(head, temperature)
    student = torch.randn(40, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = batch["counted"][0]
    z = (batch["hidden"] @ head)[batch["teacher_rows"][0][rows]]
    expected = F.kl_div(F.log_softmax(student[rows] / temperature, -1), F.log_softmax(z / temperature, -1),
                        log_target=True, reduction="batchmean") * temperature ** 2
    torch.testing.assert_close(soft_loss([student], teacher, batch).double(), expected)
    # the teacher's own logits, shifted by a constant: the same distribution at every temperature
    own = (batch["hidden"] @ head)[batch["teacher_rows"][0]] + 5.0
    assert float(soft_loss([own], teacher, batch)) == pytest.approx(0.0, abs=1e-6)
    sums = distribution_sums([own], teacher, batch)
    assert sums["rows"] == [int(rows.sum())]
    assert sums["sampled"][0] == pytest.approx(sums["rows"][0])  # sum(min(p, p)) = 1 per row
    assert sums["kl"][0] == pytest.approx(0.0, abs=1e-6)


def test_soft_targets_lower_the_kl_and_raise_acceptance(tiny_llama_dir, tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "soft"), depth=2, draft_vocab=200, epochs=2, tokens_per_step=512,
                      eval_per_kind=3, prompt_mix={"builtin": 1.0}, train_answers=32,
                      train_per_kind={"code": 16, "chat": 8, "json": 4, "math": 4}, eval_every=5,
                      checkpoint_every=5, max_num_seqs=16, targets="soft", lr=1e-2)
    report = HeadTrainer(load_checkpoint(tiny_llama_dir), cfg).run()
    before, after = report["eval_before"], report["eval"]
    for s in range(2):
        assert after["kl_per_position"][s] < before["kl_per_position"][s]
        assert after["sampled_acceptance_per_position_t0.7"][s] > before["sampled_acceptance_per_position_t0.7"][s]
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.1
    assert report["loss_last"] < report["loss_first"]
    steps = [point["step"] for point in report["curve"]]
    assert steps[0] == 0 and steps[-1] == report["steps"] and steps == sorted(steps)
    assert set(report["phase_seconds"]) == {"generate", "hidden", "train"}
