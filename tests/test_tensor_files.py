"""lowrax's one safetensors writer (io.safetensors_dir.write_tensor_file), used by every adapter, model
and AdapterHub file it saves."""

import numpy as np

from lowrax.io.safetensors_dir import read_tensor_file, write_tensor_file


def test_transposed_and_sliced_views_are_written_in_their_logical_order(tmp_path):
    """safetensors' numpy writer copies an array's memory as it lies, so a transposed view (a torch-layout
    matrix made with .T) would come back scrambled without the writer's contiguous copy."""
    kernel = np.arange(12, dtype=np.float32).reshape(3, 4)
    views = {"transposed": kernel.T, "strided": kernel[:, ::2], "plain": kernel}
    write_tensor_file(views, tmp_path / "t.safetensors")
    back = read_tensor_file(tmp_path / "t.safetensors")
    for key, view in views.items():
        np.testing.assert_array_equal(back[key], view)
