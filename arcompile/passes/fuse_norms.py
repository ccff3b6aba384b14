"""Fusion of RMSNorm and LayerNorm, and of the residual add in front of one.

Matches, one rule each (normalization always over the last dim, H = hidden size):
- ``rms_norm``: RMSNorm written out, as LLaMA / SmolLM2 / nanoGPT-style code traces it
      h = x.to(f32)?; r = rsqrt(mean(h^2 | h*h, -1, keepdim) + eps)  (or 1 / sqrt(...))
      y = weight * (h * r).to(x.dtype)?                               (weight optional)
- ``aten_rms_norm``: ``aten.rms_norm`` (``torch.nn.RMSNorm``), eps None meaning finfo.eps.
- ``layer_norm``: LayerNorm written out with a mean and a variance
      mu = mean(x, -1, keepdim); d = x - mu
      var = mean(d^2 | d*d, -1, keepdim)  |  var(x, -1, unbiased=False | correction=0, keepdim)
      y = d * rsqrt(var + eps)  |  d / sqrt(var + eps);  y = y * weight + bias  (both optional)
- ``aten_layer_norm`` / ``native_layer_norm``: the traced op (the second is what
  ``run_decompositions()`` leaves), over one trailing dim; native only when its mean and
  rstd outputs are unused.
- ``skip_rms_norm`` / ``skip_layer_norm``: a norm made above whose input is a residual add
      s = x + skip; y = norm(s)   ->   (y, s) = arc.skip_*_norm(x, skip, ...)
  The add usually has other users (the next residual add); they read ``s``.

Counts: every norm found counts once under its form's rule (``rms_norm``, ``aten_layer_norm``
…); ``skip_rms_norm`` / ``skip_layer_norm`` count how many of those then took their add.

Produces: ``arc.rms_norm(x, weight; eps[, compute_dtype])``, ``arc.layer_norm(x, weight[,
bias]; eps)``, ``arc.skip_rms_norm(x, skip, weight; eps[, compute_dtype])`` -> (y, s),
``arc.skip_layer_norm(x, skip, weight[, bias]; eps)`` -> (y, s). A missing weight becomes a
constant of ones so every norm has one. ``compute_dtype`` is set only when the trace casts up
(HF's ``x.to(float32)`` on a half-precision model). New nodes keep the module of the node they
replace; the matched nodes are removed.

Refuses (with a note saying why): a mean over another dim or without keepdim, no eps added
(``rsqrt(mean(x^2))``), an intermediate (the square, the mean, the variance, the rsqrt, the
un-weighted result) used outside the pattern, an unbiased variance, a norm over several dims,
a symbolic hidden size; for the skip form, an add with alpha != 1 or whose operands differ in
shape or dtype from the sum, and an add already taken by another norm (GPT-NeoX's parallel
residual feeds two norms from one sum: the first takes the add, the second reads ``s``).
"""

from __future__ import annotations

from typing import Any

import torch

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import CASTS, Match, producer, scalar
from arcompile.passes.numeric_check import EXACT

MEAN = "aten.mean.dim"
ADD, SUB, MUL, DIV = "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor"
POW = "aten.pow.Tensor_Scalar"
VARS = {"aten.var.correction", "aten.var.dim"}
NORM_OPS = {"arc.rms_norm": "arc.skip_rms_norm", "arc.layer_norm": "arc.skip_layer_norm"}


class FuseNorms(Pass):
    """See the module docstring."""

    name = "fuse_norms"
    # The fused references compute the same formula, some in another order (F.layer_norm for
    # a written-out mean/var): float32 measured |Δlogit| 0 on SmolLM2 and the tiny models,
    # 4e-7 on written-out LayerNorms; the float64 check sees float64 rounding only.
    tolerance = EXACT

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        for node in graph.nodes():
            if node not in graph:
                continue
            rule, m = self._match_norm(node)
            if rule is None:
                continue
            if m and not isinstance(m["x"].shape[-1], int):
                m.fail(f"the hidden size {m['x'].shape[-1]} is symbolic")
            if not m:
                result.note(f"{_where(node)}: {rule} not fused: {m.reason}")
                continue
            _rewrite_norm(graph, node, rule, m)
            result.bump(rule)
        # The residual add in front of a norm, once every norm is an arc.* op.
        for node in graph.nodes():
            if node not in graph or node.op not in NORM_OPS:
                continue
            m = match_skip(node)
            if not m:
                result.note(f"{_where(node)}: kept without its residual add: {m.reason}")
                continue
            rule = NORM_OPS[node.op].removeprefix("arc.")
            _rewrite_skip(graph, node, rule, m)
            result.bump(rule)
        return result

    @staticmethod
    def _match_norm(node: Node) -> tuple[str | None, Match]:
        """(rule, match) for a candidate anchor, (None, _) for a node that is not one."""
        if node.op == "aten.layer_norm":
            return "aten_layer_norm", match_aten_layer_norm(node)
        if node.op == "aten.native_layer_norm":
            return "native_layer_norm", match_aten_layer_norm(node)
        if node.op == "aten.rms_norm":
            return "aten_rms_norm", match_aten_rms_norm(node)
        if node.op in VARS:
            return "layer_norm", match_layer_norm(node)
        if node.op == MEAN and _square_of(node.arg("self")) is not None:
            squared = _square_of(node.arg("self"))
            if _centered(squared) is not None:
                return "layer_norm", match_layer_norm(node)
            return "rms_norm", match_rms_norm(node)
        return None, Match()


# -- traced norm ops ------------------------------------------------------------------------

def _last_dim_only(node: Node) -> Match:
    """The traced norm ops' common check: they normalize over the last dim alone."""
    x = node.arg("input")
    shape = list(node.arg("normalized_shape"))
    if len(shape) != 1 or shape[0] != x.shape[-1]:
        return Match().fail(f"normalizes over dims {shape}, not the last dim alone")
    return Match().ok()


def match_aten_layer_norm(node: Node) -> Match:
    # y = layer_norm(x, [H], weight, bias, eps)
    m = _last_dim_only(node)
    if not m:
        return m
    x = node.arg("input")
    if any(node.graph.has_uses(v) for v in node.outputs[1:]):
        return m.fail("its mean / rstd outputs are used")
    return m.ok(x=x, weight=node.arg("weight"), bias=node.arg("bias"),
                eps=float(node.arg("eps", 1e-5)), out=node.outputs[0], nodes=[node])


def match_aten_rms_norm(node: Node) -> Match:
    # y = rms_norm(x, [H], weight, eps)
    m = _last_dim_only(node)
    if not m:
        return m
    x = node.arg("input")
    eps = node.arg("eps")
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    return m.ok(x=x, weight=node.arg("weight"), eps=eps, out=node.output, nodes=[node])


# -- written-out RMSNorm --------------------------------------------------------------------

# h = x.to(f32)?;  y = weight * (h * rsqrt(mean(h^2, -1, keepdim) + eps)).to(x.dtype)?
def match_rms_norm(mean: Node) -> Match:
    m = Match()
    square = mean.arg("self")
    h = _square_of(square)
    if (why := _last_dim_mean(mean)) is not None:
        return m.fail(why)
    nodes = [square.producer, mean]
    if (why := _private(square, "the square")) or (why := _private(mean.output, "the mean square")):
        return m.fail(why)
    inv = _inverse_sqrt_plus_eps(mean.output, h, nodes)
    if not inv:
        return m.fail(inv.reason)
    x, compute_dtype = h, None
    cast = producer(h, CASTS)
    if cast is not None and cast.arg("self").dtype != h.dtype:
        x, compute_dtype = cast.arg("self"), h.dtype
        nodes.insert(0, cast)  # removed only if nothing else reads it
    normed = inv["normed"]
    back = _single_user(normed, CASTS)
    if back is not None and back.output.dtype == x.dtype and compute_dtype is not None:
        nodes.append(back)
        normed = back.output
    weight, out = _scale_by(normed, x, nodes)
    return m.ok(x=x, weight=weight, eps=inv["eps"], compute_dtype=compute_dtype, out=out,
                nodes=nodes)


# -- written-out LayerNorm ------------------------------------------------------------------

# mu = mean(x, -1, keepdim); d = x - mu; var = mean(d^2, -1, keepdim) | var(x, correction=0)
# y = d * rsqrt(var + eps) | d / sqrt(var + eps);  y = y * weight + bias
def match_layer_norm(var: Node) -> Match:
    m = Match()
    if (why := _last_dim_mean(var)) is not None:
        return m.fail(why)
    nodes: list[Node] = []
    if var.op in VARS:
        if (correction := _correction(var)) != 0:
            return m.fail(f"variance with correction={correction} (LayerNorm's is 0)")
        x = var.arg("self")
        mu_centered = [u for u, _ in x.uses() if u.op == SUB and u.arg("self") is x
                       and _mean_of(u.arg("other")) is x]
        if not mu_centered:
            return m.fail("no x - mean(x) next to the variance")
        centered = mu_centered[0].output
    else:
        square = var.arg("self")
        centered = _square_of(square)
        if (why := _private(square, "the squared deviation")):
            return m.fail(why)
        nodes.append(square.producer)
    sub = centered.producer
    mu = sub.arg("other")
    x = sub.arg("self")
    if (why := _last_dim_mean(mu.producer)) is not None:
        return m.fail(f"mean(x): {why}")
    if sub.arg("alpha", 1) != 1:
        return m.fail("x - mean(x) has alpha != 1")
    nodes = [mu.producer, sub] + nodes + [var]
    if (why := _private(var.output, "the variance")):
        return m.fail(why)
    inv = _inverse_sqrt_plus_eps(var.output, centered, nodes, numerator_alike=sub)
    if not inv:
        return m.fail(inv.reason)
    for v, what in ((mu, "the mean"), (centered, "x - mean(x)")):
        if any(u not in nodes for u, _ in v.uses()) or _is_output(v):
            return m.fail(f"{what} (%{v.name}) has another user")
    weight, out = _scale_by(inv["normed"], x, nodes)
    bias = None
    add = _single_user(out, ADD)
    if add is not None and add.arg("alpha", 1) == 1 and _private(out, "") is None:
        other = _other(add, out)
        if _is_vector(other, x):
            bias, out = other, add.output
            nodes.append(add)
    return m.ok(x=x, weight=weight, bias=bias, eps=inv["eps"], out=out, nodes=nodes)


# -- pieces both written-out forms share ------------------------------------------------------

def _inverse_sqrt_plus_eps(ms: Value, numerator: Value, nodes: list[Node],
                           numerator_alike: Node | None = None) -> Match:
    """numerator * rsqrt(ms + eps) or numerator / sqrt(ms + eps); binds eps and normed."""
    m = Match()
    users = [u for u, _ in ms.uses()]
    if len(users) != 1:
        return m.fail(f"%{ms.name} has {len(users)} users")
    add = users[0]
    if add.op != ADD:
        return m.fail(f"no eps added before the square root ({add.op} reads %{ms.name})")
    eps = scalar(_other(add, ms))
    if eps is None or add.arg("alpha", 1) != 1:
        return m.fail("what is added before the square root is not a constant eps")
    nodes.append(add)
    if (why := _private(add.output, "var + eps")):
        return m.fail(why)
    root = add.output.uses()[0][0]
    if root.op not in ("aten.rsqrt", "aten.sqrt"):
        return m.fail(f"var + eps goes to {root.op}, not rsqrt or sqrt")
    nodes.append(root)
    if (why := _private(root.output, "the rsqrt" if root.op == "aten.rsqrt" else "the sqrt")):
        return m.fail(why)
    apply = root.output.uses()[0][0]
    want = MUL if root.op == "aten.rsqrt" else DIV
    if apply.op != want:
        return m.fail(f"{root.op} output goes to {apply.op}, not {want}")
    if want == DIV and apply.arg("other") is not root.output:
        return m.fail("the sqrt is the numerator of the division")
    top = _other(apply, root.output)
    if not (top is numerator or (numerator_alike is not None and _same_op(top, numerator_alike))):
        return m.fail(f"%{getattr(top, 'name', top)} is scaled, not the input of the square")
    if top is not numerator:  # the same x - mean(x) traced twice (before CSE)
        nodes.append(top.producer)
    nodes.append(apply)
    return m.ok(eps=eps, normed=apply.output)


def _scale_by(normed: Value, x: Value, nodes: list[Node]) -> tuple[Value | None, Value]:
    """weight * normed (either order) when normed's only user multiplies by an [H] vector."""
    mul = _single_user(normed, MUL)
    if mul is None or _private(normed, "") is not None:
        return None, normed
    weight = _other(mul, normed)
    if not _is_vector(weight, x):
        return None, normed
    nodes.append(mul)
    return weight, mul.output


def _square_of(v: Any) -> Value | None:
    """h when v = h ** 2 or h * h."""
    node = producer(v, (POW, MUL))
    if node is None:
        return None
    if node.op == POW:
        return node.arg("self") if scalar(node.arg("exponent")) == 2.0 else None
    a, b = node.arg("self"), node.arg("other")
    return a if a is b and isinstance(a, Value) else None


def _centered(v: Value) -> Node | None:
    """The sub node when v = x - mean(x)."""
    sub = producer(v, SUB)
    if sub is None or _mean_of(sub.arg("other")) is not sub.arg("self"):
        return None
    return sub


def _mean_of(v: Any) -> Value | None:
    node = producer(v, MEAN)
    return node.arg("self") if node is not None else None


def _correction(var: Node) -> Any:
    """var.dim says unbiased=True/False, var.correction gives the number (default 1)."""
    if var.op == "aten.var.dim":
        return int(var.arg("unbiased", True))
    correction = var.arg("correction")
    return 1 if correction is None else correction


def _last_dim_mean(node: Node) -> str | None:
    """None when ``node`` reduces the last dim only with keepdim, else why not."""
    x = node.arg("self")
    dims = node.arg("dim")
    rank = len(x.shape)
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if [d % rank for d in dims] != [rank - 1]:
        return f"{node.op} over dims {dims}, not the last dim (of rank {rank})"
    if not node.arg("keepdim", False):
        return f"{node.op} without keepdim"
    return None


def _private(v: Value, what: str) -> str | None:
    """None when v has one user and is no graph output, else why that blocks the fusion."""
    users = v.uses()
    if len(users) != 1 or _is_output(v):
        return f"{what} (%{v.name}) has another user" if what else "shared"
    return None


def _is_output(v: Value) -> bool:
    return any(o is v for o in v.graph.outputs)


def _single_user(v: Value, ops: str | set[str]) -> Node | None:
    users = v.uses()
    wanted = {ops} if isinstance(ops, str) else set(ops)
    if len(users) == 1 and users[0][0].op in wanted:
        return users[0][0]
    return None


def _other(node: Node, v: Value) -> Any:
    a, b = node.arg("self"), node.arg("other")
    return b if a is v else a


def _is_vector(w: Any, x: Value) -> bool:
    return isinstance(w, Value) and w.shape == (x.shape[-1],)


def _same_op(v: Any, node: Node) -> bool:
    other = producer(v, node.op)
    return other is not None and other.inputs == node.inputs and other.attrs == node.attrs


# -- rewriting --------------------------------------------------------------------------------

def _rewrite_norm(graph: Graph, anchor: Node, rule: str, m: Match) -> None:
    x, out = m["x"], m["out"]
    origin, module = f"{FuseNorms.name}/{rule}", _module(m, anchor)
    weight = m["weight"]
    if weight is None:  # every arc norm has a weight; ones leave the numbers unchanged
        weight = graph.add_constant(torch.ones(x.shape[-1], dtype=x.dtype), name="norm_ones",
                                    module=module, origin=origin)
    is_rms = "rms" in rule
    inputs = [x, weight] if is_rms or m.bindings.get("bias") is None else [x, weight, m["bias"]]
    attrs: dict[str, Any] = {"eps": m["eps"]}
    if is_rms and m.bindings.get("compute_dtype") is not None:
        attrs["compute_dtype"] = m["compute_dtype"]
    fused = graph.add_node("arc.rms_norm" if is_rms else "arc.layer_norm", inputs, attrs,
                           [(out.dtype, out.shape)], module=module, origin=origin)
    out.replace_all_uses_with(fused.output)
    _erase(graph, m["nodes"])


def match_skip(norm: Node) -> Match:
    # s = x + skip; y = norm(s)  ->  (y, s) = skip_norm(x, skip)
    m = Match()
    s = norm.inputs[0]  # arc norms take (x, weight[, bias]) in that order, as their opdefs say
    add = s.producer
    if add.op in NORM_OPS.values():
        return m.fail(f"its input is the sum of {_where(add)}, already fused there")
    if add.op != ADD:
        return m.fail(f"its input comes from {add.op}, not a residual add")
    x, skip = add.arg("self"), add.arg("other")
    if add.arg("alpha", 1) != 1:
        return m.fail("the add has alpha != 1")
    for v in (x, skip):
        if not isinstance(v, Value) or v.shape != s.shape or v.dtype != s.dtype:
            return m.fail(f"add operand {_format_operand(v)} is not a {s.dtype} tensor of the "
                          f"sum's shape {s.shape}")
    return m.ok(x=x, skip=skip, add=add)


def _rewrite_skip(graph: Graph, norm: Node, rule: str, m: Match) -> None:
    y, s = norm.output, norm.inputs[0]
    fused = graph.add_node(f"arc.{rule}", (m["x"], m["skip"]) + norm.inputs[1:], dict(norm.attrs),
                           [(y.dtype, y.shape), (s.dtype, s.shape)], module=norm.module,
                           origin=f"{FuseNorms.name}/{rule}")
    y.replace_all_uses_with(fused.outputs[0])
    s.replace_all_uses_with(fused.outputs[1])
    graph.remove_node(norm)
    graph.remove_node(m["add"])


def _erase(graph: Graph, nodes: list[Node]) -> None:
    """Remove matched nodes, last first, skipping any still read elsewhere (a shared cast)."""
    for node in reversed(nodes):
        if node in graph and not any(graph.has_uses(v) for v in node.outputs):
            graph.remove_node(node)


def _module(m: Match, anchor: Node) -> str:
    # the node that makes the result carries the norm's module; the anchor may be a mean
    return m["out"].producer.module or anchor.module


def _where(node: Node) -> str:
    return f"{node.module or '<top>'} ({node.op})"


def _format_operand(v: Any) -> str:
    return repr(v) if isinstance(v, Value) else f"{v!r}"
