"""Build the candidate person detectors of ``edgecam bench accuracy`` as ONNX, offline.

Inputs are registry packages already downloaded by ``candidate_models.sh``; run with a
Python that has tensorflow-cpu 2.15 and tf2onnx 1.16:

    python scripts/candidate_models.py HUMAN_MODELS_DIR SSDLITE_PB OUT_DIR

Each model is converted, then given one float32 NHWC input named ``input`` (RGB 0..255; a
Cast in front where the graph wants int32 or uint8) so that every detector feeds frames the
same way.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import onnx
import tensorflow as tf
import tf2onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from tfjs_to_onnx import convert


def _float_input(src: Path, dst: Path, outputs: dict[str, str]) -> None:
    model = onnx.load(str(src))
    graph = model.graph
    old = graph.input[0]
    elem = old.type.tensor_type.elem_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in old.type.tensor_type.shape.dim]
    new = helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [d if d > 0 else None for d in dims]
    )
    op = "Identity" if elem == TensorProto.FLOAT else "Cast"
    attrs = {} if op == "Identity" else {"to": elem}
    graph.node.insert(0, helper.make_node(op, ["input"], [old.name], name="input_cast", **attrs))
    graph.input.remove(old)
    graph.input.insert(0, new)
    for out in graph.output:
        want = outputs[out.name]
        graph.node.append(helper.make_node("Identity", [out.name], [want], name=want))
        out.name = want
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    print(f"wrote {dst}")


def main() -> None:
    human, ssd_pb, out = (Path(a) for a in sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        convert(
            human / "centernet.json",
            t / "c.onnx",
            ["tower_0/images"],
            ["tower_0/detections"],
            [1, 512, 512, 3],
        )
        _float_input(t / "c.onnx", out / "centernet.onnx", {"tower_0/detections:0": "detections"})
        convert(
            human / "movenet-multipose.json", t / "m.onnx", ["input"], ["Identity"], [1, -1, -1, 3]
        )
        _float_input(t / "m.onnx", out / "movenet_multipose.onnx", {"Identity:0": "people"})
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString(ssd_pb.read_bytes())
        names = ["detection_boxes", "detection_scores", "detection_classes", "num_detections"]
        tf2onnx.convert.from_graph_def(
            graph,
            input_names=["image_tensor:0"],
            output_names=[n + ":0" for n in names],
            opset=13,
            output_path=str(t / "s.onnx"),
        )
        _float_input(t / "s.onnx", out / "ssdlite.onnx", {n + ":0": n for n in names})


if __name__ == "__main__":
    main()
