"""hpeft custom ops: `hpeft::PHMLinear` and `hpeft::SparseLinear` (schemas: exporters/OPS.md).

Torch side: `torch.library` ops whose implementations are the library's own math
(`hpeft_serve.methods.functional`), so the op and the model compute the same thing.
ONNX side: the ops are emitted as opaque nodes in domain "hpeft" by the (TorchScript-based) exporter's
symbolics, then their ONNX function bodies (onnxscript) are attached to the model, so stock onnxruntime
runs them with no plugin; a compiled kernel registered for the same (domain, op) would take precedence.
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset17 as op
from onnxscript.values import Opset

from hpeft_serve.methods import functional as Fn

DOMAIN = "hpeft"
OPSET = 17  # the ai.onnx opset of exported models and of the function bodies (they must match)
hpeft = Opset(DOMAIN, 1)


# ---------------------------------------------------------------- torch side
@torch.library.custom_op("hpeft::phm_linear", mutates_args=())
def phm_linear(x: torch.Tensor, rule: torch.Tensor, W_left: torch.Tensor, W_right: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    return Fn.phm_linear(x, rule, W_left, W_right, bias)


@phm_linear.register_fake
def _(x, rule, W_left, W_right, bias):
    return x.new_empty(*x.shape[:-1], W_right.shape[0] * W_right.shape[2])


@torch.library.custom_op("hpeft::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    out_f, in_f = int(shape[0]), int(shape[1])
    w = torch.zeros(out_f * in_f, dtype=values.dtype).index_put_((indices,), values).view(out_f, in_f)
    return Fn.linear(x, w, bias)


@sparse_linear.register_fake
def _(x, values, indices, shape, bias):
    return x.new_empty(*x.shape[:-1], bias.shape[0])


# ---------------------------------------------------------------- ONNX side: function bodies
@onnxscript.script(hpeft, default_opset=op)
def PHMLinear(x: FLOAT, rule: FLOAT, W_left: FLOAT, W_right: FLOAT, bias: FLOAT) -> FLOAT:
    """y = x H + bias, H = sum_i kron(rule_i, W_left_i W_right_i); contracts x with the factors, never forms H."""
    n = op.Shape(rule, start=0, end=1)
    i_dim = op.Shape(W_left, start=1, end=2)
    o_dim = op.Shape(W_right, start=2, end=3)
    lead = op.Shape(x, start=0, end=-1)
    neg1 = op.Constant(value_ints=[-1])
    X = op.Reshape(x, op.Concat(neg1, n, i_dim, axis=0))  # [M, n(j), I]
    U = op.Einsum(X, W_left, equation="mjk,ikr->mijr")  # [M, n(i), n(j), r]
    V = op.Einsum(U, rule, equation="mijr,ijp->mipr")  # [M, n(i), n(p), r]
    Y = op.Einsum(V, W_right, equation="mipr,irq->mpq")  # [M, n(p), O]
    return op.Add(op.Reshape(Y, op.Concat(lead, op.Mul(n, o_dim), axis=0)), bias)


@onnxscript.script(hpeft, default_opset=op)
def SparseLinear(x: FLOAT, values: FLOAT, indices: INT64, shape: INT64, bias: FLOAT) -> FLOAT:
    """y = x W^T + bias; W (out, in) is rebuilt from its non-zeros (flat row-major indices), then a dense MatMul
    (measured fastest on CPU: onnxruntime's sparse kernels lose to dense MatMul even at 90% sparsity)."""
    size = op.ReduceProd(shape, keepdims=1)
    flat = op.ConstantOfShape(size)  # float zeros
    flat = op.ScatterElements(flat, indices, values, axis=0)
    w = op.Reshape(flat, shape)
    return op.Add(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)


FUNCTIONS = {"PHMLinear": PHMLinear, "SparseLinear": SparseLinear}


# ---------------------------------------------------------------- exporter symbolics
def _typed(y, x, bias):
    """Output type: x's dtype and leading dims, the bias length as the last dim."""
    from torch.onnx import symbolic_helper as sh
    xs, bs = sh._get_tensor_sizes(x), sh._get_tensor_sizes(bias)
    if xs is not None and bs is not None:
        return y.setType(x.type().with_sizes(list(xs[:-1]) + [bs[0]]))
    return y


def _phm_symbolic(g, x, rule, W_left, W_right, bias):
    return _typed(g.op("hpeft::PHMLinear", x, rule, W_left, W_right, bias), x, bias)


def _sparse_symbolic(g, x, values, indices, shape, bias):
    return _typed(g.op("hpeft::SparseLinear", x, values, indices, shape, bias), x, bias)


_registered = False


def register_symbolics() -> None:
    global _registered
    if not _registered:
        torch.onnx.register_custom_op_symbolic("hpeft::phm_linear", _phm_symbolic, OPSET)
        torch.onnx.register_custom_op_symbolic("hpeft::sparse_linear", _sparse_symbolic, OPSET)
        _registered = True


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Attach the bodies of the hpeft ops the graph uses, and import the hpeft domain."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(f.domain, f.name) for f in model.functions}
    for name in sorted(used):
        fp = FUNCTIONS[name].to_function_proto()
        if (fp.domain, fp.name) not in have:
            model.functions.append(fp)
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return model
