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

An int8 memory (memory_dtype "int8", the torch bank's 8-bit format): memory_key and
memory_value int8, with key_scale (n, Ck, T) float32, one per object, channel and memory frame
(N = T·h·w, each frame's positions contiguous), and value_scale (n, 1, N), one per object and
position. The graph dequantises them with DequantizeLinear (per axis, opset 13) before the
products: the keys as (n·Ck·T, h·w) rows, the values as (n·N, Cv) rows of their transpose,
each row with its scale.
"""
import math

import onnx
from onnx import TensorProto, helper

READ_OPSET = 17
ATTENTION_OPSET = 23
# onnxruntime's CPU kernels are registered per IR version: the newest that the runtimes here load
IR_VERSION = 10


def _inputs(key_dim, value_dim, memory_dtype):
    memory_type = TensorProto.INT8 if memory_dtype == "int8" else TensorProto.FLOAT
    dims = {"query_key": (TensorProto.FLOAT, (1, key_dim, "query_positions")),
            "memory_key": (memory_type, ("objects", key_dim, "memory_positions")),
            "memory_value": (memory_type, ("objects", value_dim, "memory_positions"))}
    if memory_dtype == "int8":
        dims.update(key_scale=(TensorProto.FLOAT, ("objects", key_dim, "memory_frames")),
                    value_scale=(TensorProto.FLOAT, ("objects", 1, "memory_positions")))
    return [helper.make_tensor_value_info(name, dtype, shape)
            for name, (dtype, shape) in dims.items()]


def _memory(value_dim, memory_dtype):
    """(nodes, key, value_rows): the memory as float32 keys `key` (n, Ck, N) and value rows
    "value_rows" (n, N, Cv); an int8 memory dequantised (the module docstring)."""
    transpose = helper.make_node("Transpose", ["memory_value"], ["value_columns"],
                                 perm=[0, 2, 1])
    if memory_dtype != "int8":
        transpose.output[0] = "value_rows"
        return [transpose], "memory_key"
    nodes = [
        # keys: (n, Ck, T·hw) as (n·Ck·T, hw), one scale per row
        helper.make_node("Shape", ["key_scale"], ["key_scale_shape"]),
        helper.make_node("ReduceProd", ["key_scale_shape"], ["key_row_count"], keepdims=1),
        _constant("minus_one", [-1]),
        helper.make_node("Concat", ["key_row_count", "minus_one"], ["key_matrix_shape"], axis=0),
        helper.make_node("Reshape", ["memory_key", "key_matrix_shape"], ["key_matrix"]),
        helper.make_node("Reshape", ["key_scale", "minus_one"], ["key_row_scales"]),
        helper.make_node("DequantizeLinear", ["key_matrix", "key_row_scales"],
                         ["dequantized_key_matrix"], axis=0),
        helper.make_node("Shape", ["memory_key"], ["key_shape"]),
        helper.make_node("Reshape", ["dequantized_key_matrix", "key_shape"],
                         ["dequantized_key"]),
        # values: the transpose (n, N, Cv) as (n·N, Cv), one scale per row
        transpose,
        _constant("value_matrix_shape", [-1, value_dim]),
        helper.make_node("Reshape", ["value_columns", "value_matrix_shape"], ["value_matrix"]),
        helper.make_node("Reshape", ["value_scale", "minus_one"], ["value_row_scales"]),
        helper.make_node("DequantizeLinear", ["value_matrix", "value_row_scales"],
                         ["dequantized_value_matrix"], axis=0),
        helper.make_node("Shape", ["value_columns"], ["value_rows_shape"]),
        helper.make_node("Reshape", ["dequantized_value_matrix", "value_rows_shape"],
                         ["value_rows"])]
    return nodes, "dequantized_key"


def _constant(name, values, dtype=TensorProto.INT64):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, dtype, [len(values)], values))


def _scalar(name, value):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name, TensorProto.FLOAT, [], [value]))


def _scores(similarity, key_dim, key):
    """Nodes giving scores (n, HW, N), already scaled, of the float32 keys `key`."""
    scale = 1 / math.sqrt(key_dim)
    nodes = [helper.make_node("Transpose", ["query_key"], ["query_rows"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["query_rows", key], ["products"])]
    if similarity == "dot":
        nodes += [_scalar("scale", scale), helper.make_node("Mul", ["products", "scale"],
                                                             ["scores"])]
    else:  # l2: scale * (2 q·k - |k|²)
        nodes += [_scalar("twice_scale", 2 * scale), _scalar("scale", scale),
                  *_key_norms(key),
                  helper.make_node("Mul", ["key_norms", "scale"], ["scaled_norms"]),
                  helper.make_node("Mul", ["products", "twice_scale"], ["doubled"]),
                  helper.make_node("Sub", ["doubled", "scaled_norms"], ["scores"])]
    return nodes


def _key_norms(key):
    """Nodes giving key_norms (n, 1, N): |k|² per memory position of the keys `key`."""
    return [_constant("channel_axis", [1]),
            helper.make_node("Mul", [key, key], ["key_squares"]),
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


def read_matmul(key_dim, value_dim, similarity, memory_dtype="fp32"):
    """The whole read with MatMul, Softmax, MatMul (an onnx.ModelProto)."""
    memory, key = _memory(value_dim, memory_dtype)
    nodes = memory + _scores(similarity, key_dim, key) + [
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "value_rows"], ["rows"]),  # (n, HW, Cv)
        helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1])]
    return _model(nodes, _inputs(key_dim, value_dim, memory_dtype),
                  [_readout_output(value_dim)], "stm_read_matmul", READ_OPSET)


def read_chunk(key_dim, value_dim, similarity, memory_dtype="fp32"):
    """One chunk's read-out (normalised over the chunk) and log-sum-exp (an onnx.ModelProto)."""
    memory, key = _memory(value_dim, memory_dtype)
    nodes = memory + _scores(similarity, key_dim, key) + [
        _constant("last_axis", [-1]),
        helper.make_node("ReduceMax", ["scores"], ["row_max"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["scores", "row_max"], ["shifted"]),
        helper.make_node("Exp", ["shifted"], ["exponentials"]),
        helper.make_node("ReduceSum", ["exponentials", "last_axis"], ["row_sum"], keepdims=1),
        helper.make_node("MatMul", ["exponentials", "value_rows"], ["sums"]),  # (n, HW, Cv)
        helper.make_node("Div", ["sums", "row_sum"], ["rows"]),
        helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1]),
        helper.make_node("Log", ["row_sum"], ["log_sum"]),
        helper.make_node("Add", ["row_max", "log_sum"], ["lse_column"]),
        helper.make_node("Squeeze", ["lse_column", "last_axis"], ["lse"])]
    lse = helper.make_tensor_value_info("lse", TensorProto.FLOAT,
                                        ("objects", "query_positions"))
    return _model(nodes, _inputs(key_dim, value_dim, memory_dtype),
                  [_readout_output(value_dim), lse], "stm_read_chunk", READ_OPSET)


def read_attention(key_dim, value_dim, similarity, memory_dtype="fp32"):
    """The whole read with the Attention operator (opset 23; an onnx.ModelProto): one head,
    the query expanded to the n objects. L2 runs as a dot product of augmented vectors,
    [2q, -1]·[k, |k|²] = 2 q·k - |k|² (onnxruntime takes no mask broadcast over the queries)."""
    scale = 1 / math.sqrt(key_dim)
    nodes, memory_key = _memory(value_dim, memory_dtype)
    nodes += [_constant("head_axis", [1])]
    query, key = "query_key", memory_key
    if similarity == "l2":
        nodes += [_scalar("two", 2.0), *_key_norms(memory_key),
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
                  helper.make_node("Concat", [memory_key, "key_norms"], ["augmented_key"],
                                   axis=1)]  # (n, Ck + 1, N)
        query, key = "augmented_query", "augmented_key"
    nodes += [helper.make_node("Transpose", [query], ["query_rows"], perm=[0, 2, 1]),
              helper.make_node("Shape", [memory_key], ["memory_shape"], start=0, end=1),
              helper.make_node("Shape", ["query_rows"], ["query_shape"], start=1),
              helper.make_node("Concat", ["memory_shape", "query_shape"], ["expanded_shape"],
                               axis=0),
              helper.make_node("Expand", ["query_rows", "expanded_shape"], ["queries"]),
              helper.make_node("Unsqueeze", ["queries", "head_axis"], ["q"]),  # (n, 1, HW, Ck)
              helper.make_node("Transpose", [key], ["key_rows"], perm=[0, 2, 1]),
              helper.make_node("Unsqueeze", ["key_rows", "head_axis"], ["k"]),
              helper.make_node("Unsqueeze", ["value_rows", "head_axis"], ["v"]),
              helper.make_node("Attention", ["q", "k", "v"], ["heads"], scale=scale),
              helper.make_node("Squeeze", ["heads", "head_axis"], ["rows"]),  # (n, HW, Cv)
              helper.make_node("Transpose", ["rows"], ["readout"], perm=[0, 2, 1])]
    return _model(nodes, _inputs(key_dim, value_dim, memory_dtype),
                  [_readout_output(value_dim)], "stm_read_attention", ATTENTION_OPSET)


READ_GRAPHS = {"read": read_attention, "read_matmul": read_matmul, "read_chunk": read_chunk}
