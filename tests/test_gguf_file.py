"""Our GGUF reader against gguf's GGUFReader: the same metadata and the same tensor views, on a
file with every value type and on the real SmolLM2 file."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mtpserve.engine.errors import ModelLoadError
from mtpserve.engine.loader.gguf import default_gguf_path, load_gguf
from mtpserve.engine.loader.gguf_file import GGUFFile

# GGUFReader's own entries, which are not key-value pairs of the file
READER_ONLY = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


def assert_same(path: str) -> None:
    ours = GGUFFile(path)
    reader = gguf.GGUFReader(path)
    want = {name: field.contents() for name, field in reader.fields.items()}
    for name in READER_ONLY:
        want.pop(name)
    assert list(ours.metadata) == list(want)
    for key, value in want.items():
        assert ours.metadata[key] == value, key
        assert type(ours.metadata[key]) is type(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for got, ref in zip(ours.tensors, reader.tensors):
        assert got.tensor_type == ref.tensor_type
        assert list(got.shape) == list(ref.shape)
        assert (got.n_elements, got.n_bytes, got.data_offset) == (ref.n_elements, ref.n_bytes,
                                                                 ref.data_offset)
        assert got.data.dtype == ref.data.dtype
        assert got.data.shape == ref.data.shape
        assert np.array_equal(got.data, ref.data)


def write_every_kind(path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_array("t.ints", [3, -1, 7])
    w.add_array("t.floats", [0.5, -2.25])
    w.add_array("t.strs", ["a", "", "ünï"])
    w.add_array("t.bools", [True, False])
    w.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        value = rng.standard_normal((4, 256)).astype(np.float32)
        w.add_tensor(f"q{qtype.name}", gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    # a K-quant's bytes (gguf has no quantizer for it; the reader only cuts the bytes into rows)
    k_bytes = rng.integers(0, 256, (4, gguf.GGML_QUANT_SIZES[Q.Q4_K][1]), dtype=np.uint8)
    w.add_tensor("q4_k", k_bytes, raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_and_tensor_kind_reads_as_gguf_reads_it(tmp_path, alignment):
    write_every_kind(tmp_path / "k.gguf", alignment)
    assert_same(str(tmp_path / "k.gguf"))


def test_the_real_model_reads_as_gguf_reads_it():
    assert_same(default_gguf_path())


@pytest.mark.parametrize("cut", [10, 100, -20])
def test_a_cut_file_is_an_error(tmp_path, cut):
    write_every_kind(tmp_path / "k.gguf")
    data = (tmp_path / "k.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(ValueError, match="past the end"):
        GGUFFile(str(tmp_path / "cut.gguf"))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_gguf(str(tmp_path / "cut.gguf"))


def test_an_unknown_version_is_an_error(tmp_path):
    write_every_kind(tmp_path / "k.gguf")
    data = bytearray((tmp_path / "k.gguf").read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 7"):
        GGUFFile(str(tmp_path / "v7.gguf"))
