"""LayerNorms of a converted SavedModel rewritten as OpenVINO's MVN kernel.

A SavedModel spells LayerNorm as its moments plus arithmetic, and how
depends on who wrote it: ``(x - mean) * rsqrt(var + eps) * gamma + beta``
(``model.bert``, the reference BERT code), ``x * inv - mean * inv`` with
``inv = rsqrt(var + eps) * gamma`` (Keras 3), ``tf.nn.batch_normalization``
(Keras 2).  OpenVINO's CPU plugin fuses only the last into its MVN kernel;
the others run as eight to ten separate element-wise and reduce operations,
measured at 11% of BERT-Base's time at bfloat16 and, at int8, 12% plus
another 10% in the FakeQuantize after each LayerNorm, which cannot fuse
into a plain element-wise chain (``bench/RESULTS.md``).

``fuse_layer_norms`` finds the moments (``mean = ReduceMean(x)`` and
``var = ReduceMean((x - mean)^2)`` over the last axis, ``r = (var +
eps)^-0.5``), then the first node downstream whose value is, as a
polynomial in ``x``, ``mean``, ``r`` and the graph's constants, exactly
``(x - mean) * r * gamma + beta``, and puts ``MVN(x) * gamma + beta`` in
its place, built from the same constants.  The algebra is exact, so the
rewrite changes results by float rounding only; any other arithmetic
around the moments is left as it is.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Optional

import numpy as np

# A polynomial: monomial (sorted symbol names) -> numeric coefficient.
# Symbols: "x", "mean", "r" and "c<i>" for the i-th non-uniform constant.
Poly = dict[tuple[str, ...], float]

_MAX_DEPTH = 8  # element-wise steps searched below the moments
_ELTWISE = ("Add", "Subtract", "Multiply", "Divide", "Negative")


@dataclasses.dataclass
class _Moments:
    """One LayerNorm's statistics: ``x``, ``mean``, the reciprocal
    standard deviation (``r``, or ``std`` that divides), ``eps``."""
    x: Any  # openvino Output
    mean: Any
    eps: float
    r: Optional[Any] = None  # (var + eps)^-0.5
    std: Optional[Any] = None  # sqrt(var + eps)


def _key(output: Any) -> tuple[int, int]:
    """Identity of an ``openvino.Output`` (its node and port)."""
    return id(output.get_node()), output.get_index()


def _same(a: Any, b: Any) -> bool:
    return (a.get_node() is b.get_node()) and a.get_index() == b.get_index()


def _constant(output: Any) -> Optional[np.ndarray]:
    """The value of a Constant's output, or None for another node."""
    node = output.get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data())


def _scalar(output: Any) -> Optional[float]:
    """A constant whose elements are all equal, as a float; else None."""
    value = _constant(output)
    if value is None or value.size == 0:
        return None
    flat = value.reshape(-1)
    return float(flat[0]) if np.all(flat == flat[0]) else None


def _consumers(output: Any) -> list[Any]:
    return [target.get_node() for target in output.get_target_inputs()]


def _last_axis_mean(node: Any) -> Optional[Any]:
    """The input of a ReduceMean over the last axis that keeps dims."""
    if node.get_type_name() != "ReduceMean":
        return None
    if not node.get_attributes().get("keep_dims", False):
        return None
    axes = _constant(node.input_value(1))
    data = node.input_value(0)
    rank = data.get_partial_shape().rank
    if axes is None or axes.size != 1:
        return None
    axis = int(axes.reshape(-1)[0])
    if axis != -1 and not (rank.is_static and axis == rank.get_length() - 1):
        return None
    return data


def _squared_centred(node: Any, x: Any, mean: Any) -> bool:
    """Whether ``node`` computes ``(x - mean)^2``."""
    kind = node.get_type_name()
    if kind == "SquaredDifference":
        pair = [node.input_value(0), node.input_value(1)]
        return ((_same(pair[0], x) and _same(pair[1], mean))
                or (_same(pair[0], mean) and _same(pair[1], x)))

    def centred(output: Any) -> bool:
        sub = output.get_node()
        return (sub.get_type_name() == "Subtract"
                and _same(sub.input_value(0), x)
                and _same(sub.input_value(1), mean))
    if kind == "Power":
        return (centred(node.input_value(0))
                and _scalar(node.input_value(1)) == 2.0)
    if kind == "Multiply":
        a, b = node.input_value(0), node.input_value(1)
        return _same(a, b) and centred(a)
    return False


def _find_moments(mean_node: Any) -> list[_Moments]:
    """The LayerNorm statistics rooted at ``mean_node`` (if it is one)."""
    x = _last_axis_mean(mean_node)
    if x is None:
        return []
    mean = mean_node.output(0)
    found = []
    squares = [n for n in _consumers(mean) if _squared_centred(n, x, mean)]
    for sub in (n for n in _consumers(mean)
                if n.get_type_name() == "Subtract"):
        squares += [n for n in _consumers(sub.output(0))
                    if _squared_centred(n, x, mean)]
    for square in squares:
        for var in _consumers(square.output(0)):
            if _last_axis_mean(var) is None:
                continue
            for add in _consumers(var.output(0)):
                if add.get_type_name() != "Add":
                    continue
                others = [add.input_value(i) for i in range(2)
                          if not _same(add.input_value(i), var.output(0))]
                eps = _scalar(others[0]) if len(others) == 1 else None
                if eps is None or not eps > 0:
                    continue
                for root in _consumers(add.output(0)):
                    kind = root.get_type_name()
                    if (kind == "Power"
                            and _scalar(root.input_value(1)) == -0.5):
                        found.append(_Moments(x, mean, eps, r=root.output(0)))
                    elif kind == "Sqrt":
                        found.append(_Moments(x, mean, eps,
                                              std=root.output(0)))
    return found


def _add(a: Poly, b: Poly, sign: float = 1.0) -> Poly:
    out = dict(a)
    for mono, coef in b.items():
        out[mono] = out.get(mono, 0.0) + sign * coef
    return {m: c for m, c in out.items() if c != 0.0}


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            mono = tuple(sorted(ma + mb))
            out[mono] = out.get(mono, 0.0) + ca * cb
    return {m: c for m, c in out.items() if c != 0.0}


class _Algebra:
    """Polynomials of outputs below one LayerNorm's moments."""

    def __init__(self, moments: _Moments) -> None:
        self.m = moments
        self.constants: dict[str, Any] = {}  # symbol -> constant output
        self._symbols: dict[tuple[int, int], str] = {}
        self._memo: dict[tuple[int, int], Optional[Poly]] = {}

    def poly(self, output: Any, depth: int = 0) -> Optional[Poly]:
        """``output`` as a polynomial, or None when it is not one of the
        element-wise operations this pass understands."""
        key = _key(output)
        if key in self._memo:
            return self._memo[key]
        result = self._poly(output, depth)
        self._memo[key] = result
        return result

    def _poly(self, output: Any, depth: int) -> Optional[Poly]:
        m = self.m
        for name, known in (("x", m.x), ("mean", m.mean), ("r", m.r)):
            if known is not None and _same(output, known):
                return {(name,): 1.0}
        if _constant(output) is not None:
            return self._constant_poly(output)
        node = output.get_node()
        kind = node.get_type_name()
        if kind not in _ELTWISE or depth > _MAX_DEPTH + 4:
            return None
        if kind == "Negative":
            inner = self.poly(node.input_value(0), depth + 1)
            return None if inner is None else {k: -v for k, v in
                                               inner.items()}
        left, right = node.input_value(0), node.input_value(1)
        if kind == "Divide":
            if m.std is not None and _same(right, m.std):
                a = self.poly(left, depth + 1)
                return None if a is None else _mul(a, {("r",): 1.0})
            divisor = _scalar(right)
            a = self.poly(left, depth + 1)
            if a is None or not divisor:
                return None
            return {k: v / divisor for k, v in a.items()}
        a, b = self.poly(left, depth + 1), self.poly(right, depth + 1)
        if a is None or b is None:
            return None
        if kind == "Add":
            return _add(a, b)
        if kind == "Subtract":
            return _add(a, b, -1.0)
        return _mul(a, b)

    def _constant_poly(self, output: Any) -> Poly:
        value = _scalar(output)
        if value is not None:
            return {(): value} if value != 0.0 else {}
        key = _key(output)
        if key not in self._symbols:
            symbol = f"c{len(self._symbols)}"
            self._symbols[key] = symbol
            self.constants[symbol] = output
        return {(self._symbols[key],): 1.0}


def _layer_norm_form(poly: Poly) -> Optional[tuple[float, tuple[str, ...],
                                                   Poly]]:
    """``(k, gamma, beta)`` when ``poly`` is ``(x - mean) * r * k *
    prod(gamma) + beta`` with ``beta`` free of ``x``, ``mean`` and ``r``;
    else None."""
    variable = ("x", "mean", "r")
    with_x = [(m, c) for m, c in poly.items() if "x" in m]
    with_mean = [(m, c) for m, c in poly.items() if "mean" in m]
    if len(with_x) != 1 or len(with_mean) != 1:
        return None
    (mx, k), (mm, km) = with_x[0], with_mean[0]
    gamma_x = Counter(mx) - Counter(("x", "r"))
    gamma_m = Counter(mm) - Counter(("mean", "r"))
    if (Counter(mx)["x"] != 1 or Counter(mx)["r"] != 1
            or Counter(mm)["mean"] != 1 or Counter(mm)["r"] != 1
            or gamma_x != gamma_m or km != -k
            or any(s in variable for s in gamma_x)):
        return None
    beta = {m: c for m, c in poly.items() if m not in (mx, mm)}
    if any(s in variable for m in beta for s in m):
        return None
    return k, tuple(sorted(gamma_x.elements())), beta


def _product(ops: Any, factors: list[Any], coefficient: float,
             element_type: Any) -> Optional[Any]:
    """``coefficient * prod(factors)`` as a node (None for plain 1)."""
    node = None
    for factor in factors:
        node = factor if node is None else ops.multiply(node, factor)
    if coefficient != 1.0:
        scale = ops.constant(np.array(coefficient, np.float32),
                             element_type)
        node = scale if node is None else ops.multiply(node, scale)
    return node


def _replace(ops: Any, target: Any, moments: _Moments, k: float,
             gamma: tuple[str, ...], beta: Poly,
             constants: dict[str, Any]) -> None:
    """Puts ``MVN(x) * k * gamma + beta`` in place of ``target``."""
    kind = moments.x.get_element_type()
    axes = ops.constant(np.array([-1], np.int64))
    out = ops.mvn(moments.x, axes, True, moments.eps, "inside_sqrt")
    scale = _product(ops, [constants[s] for s in gamma], k, kind)
    if scale is not None:
        out = ops.multiply(out, scale)
    shift = None
    for mono, coef in beta.items():
        term = _product(ops, [constants[s] for s in mono], coef, kind)
        shift = term if shift is None else ops.add(shift, term)
    if shift is not None:
        out = ops.add(out, shift)
    names = target.get_names()
    out.set_friendly_name(target.get_node().get_friendly_name())
    target.replace(out.output(0))
    if names:
        target.set_names(set())
        out.output(0).set_names(names)


def _first_match(moments: _Moments) -> Optional[tuple[Any, tuple]]:
    """The first node downstream of the moments (breadth first) whose
    value is the LayerNorm, with its ``(k, gamma, beta)``; then extended
    through sole consumers that keep the form (a following ``* gamma``
    and ``+ beta``)."""
    algebra = _Algebra(moments)
    frontier = [moments.mean] + [o for o in (moments.r, moments.std) if o]
    seen: set[tuple[int, int]] = set()
    for _ in range(_MAX_DEPTH):
        following = []
        for output in frontier:
            for node in _consumers(output):
                if node.get_type_name() not in _ELTWISE:
                    continue
                out = node.output(0)
                if _key(out) in seen:
                    continue
                seen.add(_key(out))
                poly = algebra.poly(out)
                if poly is None:
                    continue
                form = _layer_norm_form(poly)
                if form is not None:
                    return _extend(algebra, out, form)
                following.append(out)
        frontier = following
    return None


def _extend(algebra: _Algebra, out: Any, form: tuple) -> tuple[Any, tuple]:
    while True:
        consumers = _consumers(out)
        if len(consumers) != 1 or consumers[0].get_type_name() not in _ELTWISE:
            break
        following = consumers[0].output(0)
        poly = algebra.poly(following)
        bigger = None if poly is None else _layer_norm_form(poly)
        if bigger is None:
            break
        out, form = following, bigger
    return out, form + (algebra.constants,)


def fuse_layer_norms(model: Any) -> int:
    """Rewrites, in place, each LayerNorm of ``model`` (an
    ``openvino.Model``) that OpenVINO would run op by op as one MVN plus
    its scale and shift; returns how many were rewritten."""
    import openvino.opset13 as ops
    fused = 0
    for node in list(model.get_ordered_ops()):
        for moments in _find_moments(node):
            if not moments.x.get_element_type().is_real():
                continue
            match = _first_match(moments)
            if match is None:
                continue
            target, (k, gamma, beta, constants) = match
            if target.get_partial_shape() != moments.x.get_partial_shape():
                continue
            _replace(ops, target, moments, k, gamma, beta, constants)
            fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return fused
