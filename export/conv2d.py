"""Graph rewrites that compute the same function faster on onnxruntime's CPU provider.

``as_conv2d``: the exported 1-D graph over ``N×C×1×L`` tensors. The CPU provider runs 2-D
convolutions in its blocked NCHWc layout with faster kernels; 1-D convolutions miss that path.
The model's interface stays ``N×1×1300``: the graph gains an Unsqueeze and a Squeeze.

``upsampling_as_conv``: each ConvTranspose (kernel 2, stride 2) as a 1×1 Conv to twice the
channels followed by a reshape that interleaves them in time. The CPU provider has no int8
ConvTranspose, but it has int8 Conv, so this lets quantization reach the decoder's upsampling.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_SPATIAL = {"kernel_shape": 1, "strides": 1, "dilations": 1, "output_padding": 0}


def _widen_attributes(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.name in _SPATIAL and len(attr.ints) == 1:
            attr.ints[:] = [_SPATIAL[attr.name], attr.ints[0]]
        elif attr.name == "pads" and len(attr.ints) == 2:
            attr.ints[:] = [0, attr.ints[0], 0, attr.ints[1]]


def as_conv2d(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing the same outputs with Conv/ConvTranspose/MaxPool in 2-D."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    supported = {"Conv", "ConvTranspose", "MaxPool", "LeakyRelu", "Relu", "Sigmoid", "Add", "Mul", "Concat", "Slice"}
    unknown = {n.op_type for n in graph.node} - supported
    if unknown:
        raise ValueError(f"cannot rewrite operators {sorted(unknown)} as 2-D")
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "MaxPool"):
            _widen_attributes(node)
            if node.op_type != "MaxPool":
                weight = inits[node.input[1]]
                array = numpy_helper.to_array(weight)
                weight.CopyFrom(numpy_helper.from_array(array[:, :, None, :], weight.name))
        elif node.op_type == "Slice" and len(node.input) > 3:
            axes = inits[node.input[3]]
            values = numpy_helper.to_array(axes)
            axes.CopyFrom(numpy_helper.from_array(values + (values >= 2), axes.name))
        elif node.op_type == "Concat":
            assert helper.get_attribute_value(node.attribute[0]) == 1, "only channel concatenation"

    (inp,), (out,) = graph.input, graph.output
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "conv2d_height_axis")
    graph.initializer.append(axes)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == inp.name:
                node.input[i] = "ecg_2d"
        for i, name in enumerate(node.output):
            if name == out.name:
                node.output[i] = "denoised_2d"
    graph.node.insert(0, helper.make_node("Unsqueeze", [inp.name, axes.name], ["ecg_2d"], name="to_2d"))
    graph.node.append(helper.make_node("Squeeze", ["denoised_2d", axes.name], [out.name], name="to_1d"))
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def upsampling_as_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a 2-D ``model`` with every stride-2, kernel-2 ConvTranspose as Conv + reshapes.

    ConvTranspose: ``y[o, 2t+j] = Σᵢ x[i, t]·W[i, o, j] + b[o]``. The 1×1 Conv computes
    ``z[2o+j, t]`` with the same sums; reshaping ``z`` to ``[N, O, 2, L]``, swapping the last two
    axes and merging them gives ``y`` exactly.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "ConvTranspose"
            or list(attrs.get("strides", [])) != [1, 2]
            or list(attrs.get("kernel_shape", [])) != [1, 2]
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])  # [I, O, 1, 2]
        bias = numpy_helper.to_array(inits[node.input[2]])
        channels_in, channels_out = weight.shape[:2]
        name = node.name
        graph.initializer.extend(
            [
                numpy_helper.from_array(
                    weight[:, :, 0, :].transpose(1, 2, 0).reshape(2 * channels_out, channels_in, 1, 1), f"{name}_weight"
                ),
                numpy_helper.from_array(np.repeat(bias, 2), f"{name}_bias"),
                numpy_helper.from_array(np.array([0, channels_out, 2, -1], dtype=np.int64), f"{name}_split"),
                numpy_helper.from_array(np.array([0, channels_out, 1, -1], dtype=np.int64), f"{name}_merge"),
            ]
        )
        nodes += [
            helper.make_node(
                "Conv",
                [node.input[0], f"{name}_weight", f"{name}_bias"],
                [f"{name}_pairs"],
                name=f"{name}_conv",
                kernel_shape=[1, 1],
            ),
            helper.make_node(
                "Reshape", [f"{name}_pairs", f"{name}_split"], [f"{name}_split_out"], name=f"{name}_reshape"
            ),
            helper.make_node(
                "Transpose", [f"{name}_split_out"], [f"{name}_interleaved"], name=f"{name}_transpose", perm=[0, 1, 3, 2]
            ),
            helper.make_node(
                "Reshape", [f"{name}_interleaved", f"{name}_merge"], [node.output[0]], name=f"{name}_merge"
            ),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model
