"""Make the batch dimension of ONNX models symbolic (see src/edgecam/models/MODELS.md).

For graphs converted from TensorFlow with the batch fixed at 1: the first dimension of the
input and outputs becomes ``batch`` and every ``Reshape`` shape constant that starts with 1
starts with 0 instead (copy the input's batch). A model whose input batch is already symbolic
is left alone. Needs ``onnx``. Run: ``python scripts/batch_models.py MODEL.onnx ...``.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import numpy_helper


def make_batch_symbolic(path: str) -> bool:
    """Rewrite ``path`` in place; False when its batch was symbolic already."""
    model = onnx.load(path)
    if not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value"):
        return False
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in constants:
            continue
        tensor = constants[node.input[1]]
        shape = numpy_helper.to_array(tensor).copy()
        if shape[0] == 1:  # shared constants are visited once per user: rewrite once
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_value != 1:
            raise SystemExit(f"{path}: {value.name} has batch {dim.dim_value}, not 1")
        dim.Clear()
        dim.dim_param = "batch"
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return True


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(name, "rewritten" if make_batch_symbolic(name) else "already symbolic")
