"""The hidden-state store of train-head: states are reused only for the same records, the same
base model and the same precision."""

import torch
from torch import nn

from mtpserve.engine.train.hidden_store import HiddenStore, model_key


class Tiny(nn.Module):
    def __init__(self, norm_value: float):
        super().__init__()
        self.proj = nn.Parameter(torch.ones(4, 4))
        self.norm = nn.Parameter(torch.full((4,), norm_value))


def record(i: int) -> dict:
    return {"prompt_ids": [1, 2, i], "output_ids": [i, 3]}


class Counting:
    """``compute`` for a store: one row per token, valued by the record, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, rec: dict) -> torch.Tensor:
        self.calls += 1
        length = len(rec["prompt_ids"]) + len(rec["output_ids"])
        return torch.full((length, 2), float(rec["prompt_ids"][-1]))


def test_model_key_tells_models_and_precisions_apart():
    a = model_key(Tiny(1.0), "float32")
    assert a == model_key(Tiny(1.0), "float32")
    assert a != model_key(Tiny(1.5), "float32")  # same shape, other norm weights
    assert a != model_key(Tiny(1.0), "bfloat16")


def test_resumed_store_computes_only_new_records(tmp_path):
    path = str(tmp_path / "hidden-train.pt")
    key = model_key(Tiny(1.0), "float32")
    first = Counting()
    states = HiddenStore(path, key, "cpu").states([record(1), record(2)], first, "test")
    assert first.calls == 2
    assert states[1].dtype == torch.float16
    again = Counting()
    states = HiddenStore(path, key, "cpu").states([record(2), record(1), record(3)], again, "test")
    assert again.calls == 1  # only record 3 is new
    assert [float(s[0, 0]) for s in states] == [2.0, 1.0, 3.0]


def test_store_of_another_precision_is_not_used(tmp_path, caplog):
    path = str(tmp_path / "hidden-train.pt")
    HiddenStore(path, model_key(Tiny(1.0), "float32"), "cpu").states([record(1)], Counting(), "t")
    other = Counting()
    with caplog.at_level("WARNING", logger="mtpserve.train"):
        store = HiddenStore(path, model_key(Tiny(1.0), "bfloat16"), "cpu")
    store.states([record(1)], other, "test")
    assert other.calls == 1
    assert "another model or precision" in caplog.text
