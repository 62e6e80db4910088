"""Convert a TensorFlow.js graph model (model.json + .bin) to ONNX, offline.

Run with a Python that has tensorflow-cpu 2.15 and tf2onnx 1.16 (see
scripts/candidate_models.sh, which makes a throwaway venv for it):

    python scripts/tfjs_to_onnx.py MODEL.json OUT.onnx --input NAME --output NAME [--output ...]
        [--input-shape 1,-1,-1,3]

The tfjs topology is a GraphDef in JSON; its weights are filled in from the .bin shards
(float16-quantised weights cast back to float32) and the tfjs-only fused ops
(_FusedConv2D, FusedDepthwiseConv2dNative, _FusedMatMul) are split back into the plain
TensorFlow ops they stand for, so that tf2onnx converts the graph.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf2onnx
from google.protobuf import json_format

_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "float16": np.float16}
_TF_DTYPES = {"float32": tf.float32, "int32": tf.int32, "bool": tf.bool}


def _weights(model_json: Path, manifest: list[dict]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        data = b"".join((model_json.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            shape = w["shape"]
            count = int(np.prod(shape)) if shape else 1
            quant = w.get("quantization")
            stored = np.dtype(_DTYPES[quant["dtype"] if quant else w["dtype"]])
            raw = np.frombuffer(data, stored, count, offset)
            offset += count * stored.itemsize
            if quant and quant["dtype"] == "float16":
                raw = raw.astype(np.float32)
            elif quant:
                raw = raw.astype(np.float32) * quant["scale"] + quant["min"]
            out[w["name"]] = raw.astype(_DTYPES[w["dtype"]]).reshape(shape)
    return out


def _attr_list(node: tf.compat.v1.NodeDef, key: str) -> list[str]:
    return [s.decode() for s in node.attr[key].list.s] if key in node.attr else []


def _split_fused(graph: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    new = tf.compat.v1.GraphDef()
    for node in graph.node:
        base = {
            "_FusedConv2D": "Conv2D",
            "FusedDepthwiseConv2dNative": "DepthwiseConv2dNative",
            "_FusedMatMul": "MatMul",
        }.get(node.op)
        if base is None:
            new.node.append(node)
            continue
        fused = _attr_list(node, "fused_ops")
        conv = new.node.add()
        conv.name = node.name + "/_conv"
        conv.op = base
        conv.input.extend(node.input[:2])
        keep = {
            "Conv2D": ("T", "strides", "padding", "data_format", "dilations", "explicit_paddings"),
            "DepthwiseConv2dNative": ("T", "strides", "padding", "data_format", "dilations"),
            "MatMul": ("T", "transpose_a", "transpose_b"),
        }[base]
        for k in keep:
            if k in node.attr:
                conv.attr[k].CopyFrom(node.attr[k])
        if base == "Conv2D" and node.attr["padding"].s != b"EXPLICIT":
            conv.attr.pop("explicit_paddings", None)
        last = conv.name
        extra = list(node.input[2:])
        for i, op in enumerate(fused):
            step = new.node.add()
            step.name = node.name if i == len(fused) - 1 else f"{node.name}/_f{i}"
            step.attr["T"].CopyFrom(node.attr["T"])
            if op == "BiasAdd":
                step.op = "BiasAdd"
                step.input.extend([last, extra.pop(0)])
                if "data_format" in node.attr:
                    step.attr["data_format"].CopyFrom(node.attr["data_format"])
            elif op in ("Relu", "Relu6", "Elu", "Sigmoid", "Tanh"):
                step.op = op
                step.input.append(last)
            elif op == "Prelu":
                # x if x > 0 else alpha * x
                alpha = extra.pop(0)
                pos = new.node.add()
                pos.name, pos.op = step.name + "/_pos", "Relu"
                pos.input.append(last)
                pos.attr["T"].CopyFrom(node.attr["T"])
                neg = new.node.add()
                neg.name, neg.op = step.name + "/_neg", "Neg"
                neg.input.append(last)
                neg.attr["T"].CopyFrom(node.attr["T"])
                negr = new.node.add()
                negr.name, negr.op = step.name + "/_negr", "Relu"
                negr.input.append(neg.name)
                negr.attr["T"].CopyFrom(node.attr["T"])
                scaled = new.node.add()
                scaled.name, scaled.op = step.name + "/_scaled", "Mul"
                scaled.input.extend([alpha, negr.name])
                scaled.attr["T"].CopyFrom(node.attr["T"])
                step.op = "Sub"
                step.input.extend([pos.name, scaled.name])
            else:
                raise SystemExit(f"fused op {op} in {node.name} is not handled")
            last = step.name
        if not fused:
            conv.name = node.name
    return new


def convert(
    model_json: Path,
    out: Path,
    inputs: list[str],
    outputs: list[str],
    input_shape: list[int] | None,
) -> None:
    model = json.loads(model_json.read_text())
    graph = json_format.ParseDict(
        model["modelTopology"], tf.compat.v1.GraphDef(), ignore_unknown_fields=True
    )
    weights = _weights(model_json, model["weightsManifest"])
    for node in graph.node:
        if node.op == "Const" and node.name in weights:
            # tfjs stores int64 constants as int32: give each the node's own dtype back.
            want = tf.as_dtype(node.attr["dtype"].type).as_numpy_dtype
            value = weights[node.name].astype(want)
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
        if node.op == "Placeholder" and input_shape is not None:
            node.attr["shape"].shape.CopyFrom(
                tf.TensorShape([None if d < 0 else d for d in input_shape]).as_proto()
            )
    graph = _split_fused(graph)
    # Drop tfjs-only attributes TF does not know.
    for node in graph.node:
        for key in [k for k in node.attr if k.startswith("_")]:
            del node.attr[key]
    model_proto, _ = tf2onnx.convert.from_graph_def(
        graph,
        input_names=[n if ":" in n else n + ":0" for n in inputs],
        output_names=[n if ":" in n else n + ":0" for n in outputs],
        opset=13,
        output_path=str(out),
    )
    print(
        f"wrote {out}: inputs {[i.name for i in model_proto.graph.input]}, "
        f"outputs {[o.name for o in model_proto.graph.output]}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_json", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--input", action="append", required=True)
    p.add_argument("--output", action="append", required=True)
    p.add_argument("--input-shape", default=None)
    a = p.parse_args()
    shape = [int(d) for d in a.input_shape.split(",")] if a.input_shape else None
    convert(a.model_json, a.out, a.input, a.output, shape)


if __name__ == "__main__":
    main()
