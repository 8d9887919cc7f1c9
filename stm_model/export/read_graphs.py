"""The memory read as ONNX graphs, written node by node (onnx.helper): what the fused read
computes, in operators every runtime has, with named dynamic axes.

    read         softmax over all memory positions with the ONNX Attention operator (opset 23),
                 for runtimes that fuse it
    read_matmul  the same with MatMul, Softmax, MatMul (opset 17): the N x HW affinity is
                 materialised, as in any unfused runtime
    read_chunk   one chunk of the memory: its normalised read-out and log-sum-exp (opset 17);
                 chunks merge exactly (merge_chunks in stm_model.deploy), so a runner reads any
                 memory with memory bounded by the chunk

Inputs: query_key (1, Ck, HW), memory_key (n, Ck, N), memory_value (n, Cv, N), float32; the
read-out is (n, Cv, HW), the log-sum-exp (n, HW). Similarity "dot": scores q·k / sqrt(Ck);
"l2": (2 q·k - |k|²) / sqrt(Ck) (-|q - k|² without the query's own norm, which the softmax
cancels), as stm_kernels.memory_read.
"""
import math

import onnx
from onnx import TensorProto, helper

READ_OPSET = 17
ATTENTION_OPSET = 23
# onnxruntime's CPU kernels are registered per IR version: the newest that the runtimes here load
IR_VERSION = 10


def _inputs(key_dim, value_dim):
    dims = {"query_key": (1, key_dim, "query_positions"),
            "memory_key": ("objects", key_dim, "memory_positions"),
            "memory_value": ("objects", value_dim, "memory_positions")}
    return [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in dims.items()]


def _constant(name, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, dtype, [len(values)], values))


def _scalar(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.FLOAT, [], [value]))


def _scores(similarity, key_dim):
    """Nodes giving scores (n, HW, N), already scaled."""
    scale = 1 / math.sqrt(key_dim)
    nodes = [helper.make_node("Transpose", ["query_key"], ["query_rows"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["query_rows", "memory_key"], ["products"])]
    if similarity == "dot":
        nodes += [_scalar("scale", scale), helper.make_node("Mul", ["products", "scale"],
                                                             ["scores"])]
    else:  # l2: scale * (2 q·k - |k|²)
        nodes += [_scalar("twice_scale", 2 * scale), _scalar("scale", scale),
                  *_key_norms(),
                  helper.make_node("Mul", ["key_norms", "scale"], ["scaled_norms"]),
                  helper.make_node("Mul", ["products", "twice_scale"], ["doubled"]),
                  helper.make_node("Sub", ["doubled", "scaled_norms"], ["scores"])]
    return nodes


def _key_norms():
    """Nodes giving key_norms (n, 1, N): |k|² per memory position."""
    return [_constant("channel_axis", [1]),
            helper.make_node("Mul", ["memory_key", "memory_key"], ["key_squares"]),
            helper.make_node("ReduceSum", ["key_squares", "channel_axis"], ["key_norms"],
                             keepdims=1)]


def _model(nodes, inputs, outputs, name, opset):
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="stm-kernels")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _readout_output(value_dim):
    return helper.make_tensor_value_info("readout", TensorProto.FLOAT,
                                         ("objects", value_dim, "query_positions"))


def read_matmul(key_dim, value_dim, similarity):
    """The whole read with MatMul, Softmax, MatMul (an onnx.ModelProto)."""
    nodes = _scores(similarity, key_dim) + [
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("Transpose", ["memory_value"], ["value_rows"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["weights", "value_rows"], ["rows"]),  # (n, HW, Cv)
        helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1])]
    return _model(nodes, _inputs(key_dim, value_dim), [_readout_output(value_dim)],
                  "stm_read_matmul", READ_OPSET)


def read_chunk(key_dim, value_dim, similarity):
    """One chunk's read-out (normalised over the chunk) and log-sum-exp (an onnx.ModelProto)."""
    nodes = _scores(similarity, key_dim) + [
        _constant("last_axis", [-1]),
        helper.make_node("ReduceMax", ["scores"], ["row_max"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["scores", "row_max"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["exponentials"]),
        helper.make_node("ReduceSum", ["exponentials", "last_axis"], ["row_sum"], keepdims=1),
        helper.make_node("Transpose", ["memory_value"], ["value_rows"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["exponentials", "value_rows"], ["sums"]),  # (n, HW, Cv)
        helper.make_node("Div", ["sums", "row_sum"], ["rows"]),
        helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1]),
        helper.make_node("Log", ["row_sum"], ["log_sum"]),
        helper.make_node("Add", ["row_max", "log_sum"], ["lse_column"]),
        helper.make_node("Squeeze", ["lse_column", "last_axis"], ["lse"])]
    lse = helper.make_tensor_value_info("lse", TensorProto.FLOAT,
                                        ("objects", "query_positions"))
    return _model(nodes, _inputs(key_dim, value_dim), [_readout_output(value_dim), lse],
                  "stm_read_chunk", READ_OPSET)


def read_attention(key_dim, value_dim, similarity):
    """The whole read with the Attention operator (opset 23; an onnx.ModelProto): one head,
    the query expanded to the n objects. L2 runs as a dot product of augmented vectors,
    [2q, -1]·[k, |k|²] = 2 q·k - |k|² (onnxruntime takes no mask broadcast over the queries)."""
    scale = 1 / math.sqrt(key_dim)
    nodes = [_constant("head_axis", [1])]
    query, key = "query_key", "memory_key"
    if similarity == "l2":
        nodes += [_scalar("two", 2.0), *_key_norms(),
                  helper.make_node("Mul", ["query_key", "two"], ["doubled_query"]),
                  helper.make_node("Shape", ["query_key"], ["minus_ones_shape"]),
                  _constant("one_channel", [1]),
                  helper.make_node("ScatterElements", ["minus_ones_shape", "one_channel",
                                                       "one_channel"], ["ones_shape"]),
                  helper.make_node("ConstantOfShape", ["ones_shape"], ["minus_ones"],
                                   value=helper.make_tensor("minus_one", TensorProto.FLOAT,
                                                            [1], [-1.0])),
                  helper.make_node("Concat", ["doubled_query", "minus_ones"],
                                   ["augmented_query"], axis=1),  # (1, Ck + 1, HW)
                  helper.make_node("Concat", ["memory_key", "key_norms"], ["augmented_key"],
                                   axis=1)]  # (n, Ck + 1, N)
        query, key = "augmented_query", "augmented_key"
    nodes += [helper.make_node("Transpose", [query], ["query_rows"], perm=[0, 2, 1]),
              helper.make_node("Shape", ["memory_key"], ["memory_shape"], start=0, end=1),
              helper.make_node("Shape", ["query_rows"], ["query_shape"], start=1),
              helper.make_node("Concat", ["memory_shape", "query_shape"], ["expanded_shape"],
                               axis=0),
              helper.make_node("Expand", ["query_rows", "expanded_shape"], ["queries"]),
              helper.make_node("Unsqueeze", ["queries", "head_axis"], ["q"]),  # (n, 1, HW, Ck)
              helper.make_node("Transpose", [key], ["key_rows"], perm=[0, 2, 1]),
              helper.make_node("Unsqueeze", ["key_rows", "head_axis"], ["k"]),
              helper.make_node("Transpose", ["memory_value"], ["value_rows"], perm=[0, 2, 1]),
              helper.make_node("Unsqueeze", ["value_rows", "head_axis"], ["v"]),
              helper.make_node("Attention", ["q", "k", "v"], ["heads"], scale=scale),
              helper.make_node("Squeeze", ["heads", "head_axis"], ["rows"]),  # (n, HW, Cv)
              helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1])]
    return _model(nodes, _inputs(key_dim, value_dim), [_readout_output(value_dim)],
                  "stm_read_attention", ATTENTION_OPSET)


READ_GRAPHS = {"read": read_attention, "read_matmul": read_matmul, "read_chunk": read_chunk}
