"""Rewrite the exported 1-D graph as the same function over ``N×C×1×L`` tensors.

onnxruntime's CPU provider runs 2-D convolutions in its blocked NCHWc layout with faster
kernels; 1-D convolutions miss that path. The model's interface stays ``N×1×1300``: the graph
gains an Unsqueeze at its input and a Squeeze at its output.
"""
from __future__ import annotations

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
    axes = numpy_helper.from_array(__import__("numpy").array([2], dtype="int64"), "conv2d_height_axis")
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
