"""Points of any PyTorch model: :class:`GraphNet` gives an arbitrary ``nn.Module`` (torchvision, timm, your own)
the interface of the zoo's networks (:class:`~symstitch.network.PointNetwork`), so that stitching, similarity
metrics and the weight-space action work on it unchanged. It is one of two kinds: a :class:`TracedNet` where
torch.fx traces the model, else a :class:`HookedNet`; ``GraphNet(model)`` builds the one that runs it.

**Points.** The model is traced with ``torch.fx`` by torchvision's feature-extraction tracer
(:func:`torchvision.models.feature_extraction.get_graph_node_names` gives the same names), in eval mode. A point is

* a *graph node name*, named as users name layers: ``layer2.1.conv1``, ``blocks.3.mlp.act``; a module called
  twice gets one node per call (torchvision's ResNet block applies one ``relu`` after ``bn1`` and again after
  the residual sum: ``layer2.1.relu`` and ``layer2.1.relu_1``), and a function gets its parent's path
  (``layer2.1.add``);
* or a *module name* of ``model.named_modules()``: its output (the first call's, if it is called several
  times), as torch_cka and similar tools read a layer name: ``layer2.1`` is the block's output.

An unknown name is a ``ValueError`` listing the nearest names (``difflib``). ``symstitch points <model>``
lists them.

**Feature, stitch and inner points.** *Feature points* are the outputs of activations (modules such as
``nn.ReLU``/``nn.GELU`` or functions such as ``F.relu``), in forward order. A point is a *cut* when every
path from the input to the output passes through it; the cuts among the feature points are the *stitch
points*, the other feature points the *inner points*. Every point can be split at: ``net.split(x, p)`` gives
``(h, carry)``, where the carry holds the other tensors the rest of the network still needs (``None`` at a
cut, a tuple otherwise: a residual block's input at a ReLU inside the block), and ``net.forward_from(h, p,
carry)`` runs the rest. Stitching at an inner point therefore continues B from T(h) with A's carry: the
paper's protocol for points inside residual blocks.

**Models that do not trace** (data-dependent control flow) run with forward hooks: a :class:`HookedNet`
(``GraphNet(model, trace=False)`` asks for one). Points are then the module names only (``name_k`` for the k-th further call of a module
called several times); cuts are not known, so every activation module is offered as a stitch point.
``split(x, p)`` runs the model up to the module and stops; its carry is the input ``x`` itself, and
``forward_from(h, p, x)`` runs the *whole* model on ``x`` with a hook that replaces the module's output by
``h``: B's prefix is computed and discarded, and whatever bypasses the point comes from B's own prefix
(not A's, as in the traced mode).

**The group at a point** (:meth:`GraphNet.point_activation`): the activation that produced the point picks its
intertwiner group (ReLU/LeakyReLU → positive-scaled permutations G_ReLU, GELU/SiLU/sigmoid → permutations,
tanh → signed permutations; :mod:`symstitch.symmetry`). Parameter-free channel-wise operations after the
activation keep its group (dropout, identity, average pooling; max pooling only where the group has no negative
scales), and :meth:`GraphNet.describe` says so. Any other point (a convolution's output, a residual sum, a
LayerNorm) refuses with the reason, unless the network was given ``activation=`` explicitly.

**Tokens.** A transformer point is ``(N, L, C)``: channels last, L tokens (stitching maps every token with the
same C×C layer; the metrics read the tokens as positions). Prefix tokens (the class token; timm's
``num_prefix_tokens``) are handled by ``class_token`` for the features the similarity metrics see:
``"kept"`` (default: one more position), ``"dropped"`` (patch tokens only) or ``"separate"`` (the point
gives the patch tokens, and ``<point>[cls]`` the prefix tokens alone). Stitching always maps every token,
the class token included.
"""

from __future__ import annotations

import abc
import copy
import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from symstitch.network import PointNetwork, Site, is_network, plain_site

Tensor = torch.Tensor

#: activation module classes → activation name (a :data:`symstitch.symmetry.NONLINEARITIES` name)
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid",
    nn.SiLU: "silu",
    nn.Tanh: "tanh",
}

#: activation functions (``call_function`` nodes) → activation name
ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.leaky_relu: "leaky_relu", F.gelu: "gelu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.silu: "silu", torch.tanh: "tanh", F.tanh: "tanh",
}

#: activation methods (``call_method`` nodes, ``x.relu()``) → activation name
ACTIVATION_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh",
                                      "sigmoid_": "sigmoid", "tanh_": "tanh"}

#: parameter-free channel-wise modules that keep the group of the activation before them; the value says
#: whether they also commute with negative scales (max pooling does not)
CHANNELWISE_MODULES: dict[type[nn.Module], bool] = {
    nn.Identity: True, nn.Dropout: True, nn.Dropout1d: True, nn.Dropout2d: True,
    nn.AvgPool1d: True, nn.AvgPool2d: True, nn.AdaptiveAvgPool1d: True, nn.AdaptiveAvgPool2d: True,
    nn.MaxPool1d: False, nn.MaxPool2d: False, nn.AdaptiveMaxPool1d: False, nn.AdaptiveMaxPool2d: False,
}
CHANNELWISE_FUNCTIONS: dict[Callable, bool] = {
    F.dropout: True, F.avg_pool2d: True, F.adaptive_avg_pool2d: True, F.max_pool2d: False,
    F.adaptive_max_pool2d: False,
}

#: activations whose group has negative scales (max pooling after them breaks the group)
SIGNED_ACTIVATIONS = ("tanh",)

CLASS_TOKEN_MODES = ("kept", "dropped", "separate")
#: suffix of the prefix-token feature of a point when ``class_token="separate"``
CLS_SUFFIX = "[cls]"

#: input size used for shapes when neither the caller nor the model (timm's ``pretrained_cfg``) says
DEFAULT_INPUT_SHAPE = (1, 3, 32, 32)


class TraceError(RuntimeError):
    """The model could not be traced by torch.fx (GraphNet then falls back to forward hooks)."""


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted output is captured."""


def _tracer_kwargs(model: nn.Module) -> dict[str, Any]:
    """Leaf modules and functions that must not be traced through: timm registers its own."""
    if type(model).__module__.startswith("timm."):
        try:
            from timm.layers import _fx as timm_fx
            return {"leaf_modules": list(timm_fx._leaf_modules), "autowrap_functions": list(timm_fx._autowrap_functions)}
        except (ImportError, AttributeError):
            return {}
    return {}


def _trace(model: nn.Module) -> tuple[fx.Graph, dict[fx.Node, str], dict[str, fx.Node]]:
    """``(graph, node → name, module name → output node)`` of ``model`` traced in eval mode."""
    from torchvision.models.feature_extraction import NodePathTracer

    class Tracer(NodePathTracer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.module_outputs: dict[str, fx.Node] = {}

        def call_module(self, m, forward, args, kwargs):
            out = super().call_module(m, forward, args, kwargs)
            name = self.path_of_module(m)
            if isinstance(out, fx.Proxy) and name:
                self.module_outputs.setdefault(name, out.node)
            return out

    tracer = Tracer(**_tracer_kwargs(model))
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: not traceable
        raise TraceError(f"{type(model).__name__} does not trace with torch.fx: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    return graph, dict(tracer.node_to_qualname), tracer.module_outputs


@dataclass(frozen=True)
class PointInfo:
    """One point of a network, as ``symstitch points`` lists it."""

    name: str
    kind: str  # "cut", "inner" (splits with a carry) or "point"
    op: str  # what computes it: "ReLU", "conv2d", "add", …
    shape: Optional[tuple[int, ...]]  # without the batch dimension
    activation: Optional[str]  # the activation name picking the group, None where none is known
    note: str  # which group it uses and why, or why none


class _PicksTheKind(abc.ABCMeta):
    """``GraphNet(model, …)`` builds the kind that runs ``model``: a :class:`TracedNet` when torch.fx traces it,
    else a :class:`HookedNet` (as ``pathlib.Path(…)`` builds a ``PosixPath`` or a ``WindowsPath``)."""

    def __call__(cls, model: nn.Module, *args: Any, trace: bool = True, **options: Any) -> "GraphNet":
        if cls is not GraphNet:
            return super().__call__(model, *args, **options)
        if not trace:
            return HookedNet(model, *args, **options)
        try:
            return TracedNet(model, *args, **options)
        except TraceError as err:
            return HookedNet(model, *args, trace_error=str(err), **options)


class GraphNet(nn.Module, metaclass=_PicksTheKind):
    """Any ``nn.Module`` as a :class:`~symstitch.network.PointNetwork`, like the zoo's
    :class:`~symstitch.models.base.StagedNet`. ``GraphNet(model, …)`` gives a :class:`TracedNet`, or a
    :class:`HookedNet` where the model does not trace; both answer every question the same way.

    Args:
        model: the network (registered as the submodule ``model``; its weights are shared, not copied).
        input_shape: a batch shape for shape inference, e.g. ``(1, 3, 224, 224)``; default: the model's
            patch embedding's image size or ``pretrained_cfg["input_size"]`` (timm), else ``(1, 3, 32, 32)``.
        activation: the activation to assume where a point does not follow one (by default such points refuse
            group-aware use with the reason).
        class_token: ``"kept"``, ``"dropped"`` or ``"separate"`` (module docstring, *Tokens*).
        prefix_tokens: the number of prefix tokens; default timm's ``num_prefix_tokens``, 1 when the model has
            a ``class_token``/``cls_token`` attribute, else 0.
        trace: ``False`` skips torch.fx: a :class:`HookedNet`.
    """

    #: how the kind runs the model: ``"fx"`` (a traced graph) or ``"hooks"`` (forward hooks)
    mode: str
    #: why torch.fx did not trace the model (None when it was not asked to)
    trace_error: Optional[str] = None

    def __init__(self, model: nn.Module, *, input_shape: Optional[Sequence[int]] = None,
                 activation: Optional[str] = None, class_token: str = "kept", prefix_tokens: Optional[int] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"GraphNet wraps an nn.Module; got {type(model).__name__}")
        if class_token not in CLASS_TOKEN_MODES:
            raise ValueError(f"class_token is one of {', '.join(CLASS_TOKEN_MODES)}; got {class_token!r}")
        self.model = model
        self.input_shape = tuple(input_shape) if input_shape else _input_shape_of(model)
        self.given_activation = activation
        self.class_token = class_token
        if prefix_tokens is None:
            prefix_tokens = getattr(model, "num_prefix_tokens", None)
        if prefix_tokens is None:
            prefix_tokens = int(any(hasattr(model, a) for a in ("class_token", "cls_token")))
        self.prefix_tokens = int(prefix_tokens)
        self.__dict__["_shapes"] = None

    def _options(self) -> dict[str, Any]:
        """The keyword arguments that build this network again around a model."""
        return {"input_shape": self.input_shape, "activation": self.given_activation,
                "class_token": self.class_token, "prefix_tokens": self.prefix_tokens}

    # ------------------------------------------------------------------ copies re-trace (graphs hold nodes)
    def __deepcopy__(self, memo: dict) -> "GraphNet":
        return type(self)(copy.deepcopy(self.model, memo), **self._options())

    def __getstate__(self) -> dict:
        raise TypeError("a GraphNet is not pickled; save model.state_dict() and wrap the model again")

    @property
    def label(self) -> str:
        """The wrapped model's class name."""
        return type(self.model).__name__

    def as_graph(self, input_shape: Optional[Sequence[int]] = None) -> "GraphNet":
        """Itself; with ``input_shape``, the same model wrapped again for shapes of that input."""
        if input_shape is None:
            return self
        return type(self)(self.model, **{**self._options(), "input_shape": input_shape})

    # ------------------------------------------------------------------ names (each kind: its own points)
    @property
    @abc.abstractmethod
    def points(self) -> tuple[str, ...]:
        """Every point's name, in forward order (each kind lists its own)."""

    @property
    def split_points(self) -> tuple[str, ...]:
        """Where the network splits: every point."""
        return self.points

    def unknown_point(self, point: str, what: str = "point") -> ValueError:
        near = difflib.get_close_matches(point, self.points, n=6, cutoff=0.5)
        hint = f"; nearest: {', '.join(near)}" if near else f"; it has {len(self.points)} points (symstitch points)"
        return ValueError(f"{type(self.model).__name__} has no {what} {point!r}{hint}")

    def check_split_point(self, point: str) -> None:
        self.resolve(point)

    def check_stitch_point(self, point: str) -> int:
        self.check_split_point(point)
        return self.points.index(point) if point in self.points else 0

    def check_feature_point(self, point: str) -> None:
        """Any point of the graph has features (a node or module name; ``<point>[cls]`` for prefix tokens)."""
        if point not in self.feature_points:
            self.check_split_point(point[: -len(CLS_SUFFIX)] if point.endswith(CLS_SUFFIX) else point)

    @abc.abstractmethod
    def resolve(self, point: str) -> str:
        """The name a point stands for (traced: a module name gives its output node's name)."""

    # ------------------------------------------------------------------ running the model
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def forward_to(self, x: Tensor, point: str) -> Tensor:
        return self.split(x, point)[0]

    @abc.abstractmethod
    def _outputs(self, x: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
        """The raw (cloned) outputs at ``points``, from one forward pass."""

    @abc.abstractmethod
    def _all_outputs(self, x: Tensor) -> dict[str, Any]:
        """The output of every point reached, from one forward pass."""

    def point_module(self, point: str) -> None:
        """None: a graph's features come from :meth:`features` (a point may be a node inside a module)."""
        return None

    def features(self, x: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
        """The (cloned) outputs at ``points`` for input ``x``, from one forward pass (``class_token`` applied to
        token points; ``<point>[cls]`` names the prefix tokens when it is ``"separate"``)."""
        base = {p: p[: -len(CLS_SUFFIX)] if p.endswith(CLS_SUFFIX) else p for p in points}
        raw = self._outputs(x, list(dict.fromkeys(base.values())))
        out = {}
        for p, b in base.items():
            t = raw[b]
            if self._has_prefix(tuple(t.shape[1:])) and self.class_token != "kept":
                t = t[:, self.prefix_tokens:] if p == b else t[:, : self.prefix_tokens]
            elif p != b:
                raise ValueError(f"{p!r}: {b!r} has no prefix tokens (shape {tuple(t.shape)})")
            out[p] = t
        return out

    def _has_prefix(self, shape: tuple[int, ...]) -> bool:
        return self.prefix_tokens > 0 and len(shape) == 2 and shape[0] > self.prefix_tokens

    # ------------------------------------------------------------------ shapes and sizes
    @torch.no_grad()
    def feature_shapes(self, input_shape: Optional[Sequence[int]] = None,
                       points: Optional[Sequence[str]] = None) -> dict[str, tuple[int, ...]]:
        """Shape (without the batch dimension) of every point (or of ``points``), from one forward pass of zeros."""
        cached = self.__dict__.get("_shapes")
        if cached is None or input_shape is not None:
            p = next(self.model.parameters(), None)
            x = torch.zeros(*(input_shape or self.input_shape), device=p.device if p is not None else "cpu",
                            dtype=p.dtype if p is not None else torch.float32)
            was_training = self.model.training
            self.model.eval()
            try:
                outs = self._all_outputs(x)
            finally:
                self.model.train(was_training)
            cached = {name: tuple(t.shape[1:]) for name, t in outs.items() if isinstance(t, Tensor)}
            if input_shape is None:
                self.__dict__["_shapes"] = cached
        if points is None:
            return dict(cached)
        out = {}
        for q in points:
            base = q[: -len(CLS_SUFFIX)] if q.endswith(CLS_SUFFIX) else q
            if base not in cached:
                self.check_split_point(base)
                raise ValueError(f"{base!r} is not a tensor point")
            shape = cached[base]
            if self._has_prefix(shape) and self.class_token != "kept":
                shape = (shape[0] - self.prefix_tokens, *shape[1:]) if q == base else (self.prefix_tokens, *shape[1:])
            out[q] = shape
        return out

    def point_shape(self, point: str) -> tuple[int, ...]:
        """The shape at ``point`` without the batch dimension (``input_shape``'s batch)."""
        return self.feature_shapes(points=[point])[point]

    def point_channels(self, point: str) -> int:
        """C at ``point``: dim 1 of (N, C) and (N, C, H, W), the last dim of tokens (N, L, C)."""
        shape = self.point_shape(point)
        return shape[-1] if len(shape) == 2 else shape[0]

    @property
    def num_classes(self) -> int:
        given = getattr(self.model, "num_classes", None)
        if isinstance(given, int):
            return given
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(self.model).__name__}: the number of classes is unknown (no num_classes, no Linear)")
        return linears[-1].out_features

    # ------------------------------------------------------------------ groups
    @abc.abstractmethod
    def _group_source(self, point: str) -> tuple[Optional[str], str, list[str]]:
        """``(activation, op, [channel-wise ops after it])`` or ``(None, op, reason)`` for a point."""

    def point_activation(self, point: str) -> str:
        """The activation whose intertwiner group acts at ``point``; ValueError with the reason where none does."""
        base = point[: -len(CLS_SUFFIX)] if point.endswith(CLS_SUFFIX) else point
        act, op, through = self._group_source(base)
        if act is not None:
            return act
        if self.given_activation:
            return self.given_activation
        reason = "; ".join(through) if through else f"it is the output of {op}, not of an activation"
        near = [p for p in self.feature_points if not p.endswith(CLS_SUFFIX)]
        raise ValueError(f"{point!r} of {type(self.model).__name__}: no intertwiner group is known there ({reason}); "
                         f"use a point right after an activation ({', '.join(near[:6])}{', …' if len(near) > 6 else ''}) "
                         "or give the network's activation explicitly (GraphNet(model, activation='relu'))")

    #: the name GraphNet has always given :meth:`point_activation`
    activation_at = point_activation

    @property
    def activation(self) -> str:
        """The activation of the whole network where it has one kind of activation (the zoo's attribute)."""
        kinds = {self.point_activation(p) for p in self.feature_points if not p.endswith(CLS_SUFFIX)}
        if self.given_activation:
            return self.given_activation
        if len(kinds) != 1:
            raise ValueError(f"{type(self.model).__name__} has activations {sorted(kinds) or 'none'}: ask per point "
                             "(point_activation)")
        return kinds.pop()

    @abc.abstractmethod
    def point_kind(self, point: str) -> str:
        """``"cut"``, ``"inner"`` (splits with a carry), or ``"point"`` where the kind is not known."""

    @property
    def note(self) -> str:
        """What to know about how the points were found ('' for a traced graph)."""
        return ""

    def describe(self) -> list[PointInfo]:
        """Every point with its kind, operation, shape and group note (what ``symstitch points`` prints)."""
        shapes = self.feature_shapes()
        rows = []
        for p in self.points:
            act, op, through = self._group_source(p)
            if act is not None:
                note = act if not through else f"{act}, kept through {', '.join(through)}"
            elif self.given_activation:
                note = f"{self.given_activation} (given)"
            else:
                note = "; ".join(through) or "—"
            rows.append(PointInfo(p, self.point_kind(p), op, shapes.get(self.resolve(p)), act or self.given_activation,
                                  note))
        return rows

    # ------------------------------------------------------------------ the weight-space action
    @abc.abstractmethod
    def linear_neighbours(self, point: str) -> tuple[nn.Module, Optional[nn.Module], tuple[nn.Module, ...], nn.Module]:
        """``(layer, norm, between, next_layer)`` around an activation point (:meth:`TracedNet.linear_neighbours`);
        ValueError with the reason where the point is not of that form."""

    def symmetry_sites(self) -> dict[str, Site]:
        """Every activation point ``σ(norm(layer(h)))`` → parameter-free channel-wise modules → ``next_layer``
        (Conv or Linear, each tensor on the way read once; :meth:`linear_neighbours`). A residual stream, or an
        activation read by several layers, has no action here (docs/method.md §1)."""
        sites = {}
        for point in self.feature_points:
            try:
                sites[point] = plain_site(*self.linear_neighbours(point))
            except ValueError:
                continue
        return sites

    def no_action_reason(self, point: str) -> str:
        """Why :meth:`linear_neighbours` finds no site at ``point``."""
        try:
            self.linear_neighbours(point)
        except ValueError as err:
            return str(err)
        return ""


class TracedNet(GraphNet):
    """A model traced by torch.fx: points are graph nodes and module names, cuts are known, and the rest of the
    network runs from a point with A's carry (module docstring). :class:`TraceError` where the model does not
    trace."""

    mode = "fx"

    def __init__(self, model: nn.Module, **options: Any):
        super().__init__(model, **options)
        self._build(*_trace(model))

    # ------------------------------------------------------------------ the graph
    def _build(self, graph: fx.Graph, names: dict[fx.Node, str], module_outputs: dict[str, fx.Node]) -> None:
        nodes = [n for n in graph.nodes]
        index = {n: i for i, n in enumerate(nodes)}
        last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
        inputs = [n for n in nodes if n.op == "placeholder"]
        self.__dict__["_graph"] = graph
        self.__dict__["_nodes"] = nodes
        self.__dict__["_index"] = index
        self.__dict__["_last_use"] = last_use
        self.__dict__["_input"] = inputs[0]
        by_name: dict[str, fx.Node] = {}
        for n in nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            by_name.setdefault(names.get(n, n.name), n)
        for module, n in module_outputs.items():
            by_name.setdefault(module, n)
        self.__dict__["_by_name"] = by_name
        # the name a node is listed under: its own node name (a module output node is named after its leaf)
        self.__dict__["_node_name"] = {n: names.get(n, n.name) for n in nodes}
        # tensors alive after each node (what forward_from needs besides the point): the carry
        live: dict[fx.Node, tuple[fx.Node, ...]] = {}
        alive: list[fx.Node] = []
        for i, n in enumerate(nodes):
            alive = [a for a in alive if last_use[a] > i]
            if n.op not in ("get_attr", "output") and not (n.op == "placeholder" and n is not inputs[0]) \
                    and last_use[n] > i:
                alive.append(n)
            live[n] = tuple(a for a in alive if a is not n)
        self.__dict__["_live"] = live
        feature = [n for n in nodes if self._activation_of_node(n) is not None]
        self.__dict__["_feature_nodes"] = feature

    # ------------------------------------------------------------------ names
    @property
    def points(self) -> tuple[str, ...]:
        """Every point, in forward order: graph node names, then module names that name no node themselves
        (a module's output)."""
        order = sorted(self._by_name.items(), key=lambda item: (self._index[item[1]], item[0] != self._node_name[item[1]]))
        return tuple(name for name, _ in order)

    @property
    def feature_points(self) -> tuple[str, ...]:
        names = [self._node_name[n] for n in self._feature_nodes]
        if self.class_token == "separate":
            shapes = self.feature_shapes(points=names)
            names = [q for p in names for q in ((p, p + CLS_SUFFIX) if self._has_prefix(shapes[p]) else (p,))]
        return tuple(names)

    @property
    def stitch_points(self) -> tuple[str, ...]:
        """The feature points that are cuts."""
        return tuple(self._node_name[n] for n in self._feature_nodes if not self._live[n])

    @property
    def inner_points(self) -> tuple[str, ...]:
        return tuple(self._node_name[n] for n in self._feature_nodes if self._live[n])

    def is_cut(self, point: str) -> bool:
        return not self._live[self._node(point)]

    def point_kind(self, point: str) -> str:
        return "cut" if self.is_cut(point) else "inner"

    def _node(self, point: str) -> fx.Node:
        try:
            return self._by_name[point]
        except KeyError:
            raise self.unknown_point(point) from None

    def resolve(self, point: str) -> str:
        """The node name a point stands for (a module name gives its output node's name)."""
        return self._node_name[self._node(point)]

    # ------------------------------------------------------------------ running the graph
    def _eval_node(self, node: fx.Node, env: dict) -> Any:
        def load(n: fx.Node) -> Any:
            if n in env:
                return env[n]
            if n.op == "placeholder" and n is not self._input and n.args:
                return n.args[0]  # an optional input of forward (timm's attn_mask): its default
            raise KeyError(f"the value of {self._node_name.get(n, n.name)!r} is missing")

        args = fx.node.map_arg(node.args, load)
        kwargs = fx.node.map_arg(node.kwargs, load)
        if node.op == "placeholder":
            if node in env:
                return env[node]
            if node.args:
                return node.args[0]  # an optional argument: its default
            raise TypeError(f"the graph input {node.name!r} has no value")
        if node.op == "get_attr":
            value: Any = self.model
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            return self.model.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unknown graph operation {node.op!r}")

    def _run(self, env: dict, start: int, stop: int, capture: Iterable[fx.Node] = (),
             keep: Iterable[fx.Node] = ()) -> dict:
        """Run nodes ``start..stop-1`` over ``env`` (freeing what no later node needs); captured nodes are cloned
        as soon as they are computed (later in-place operations, such as ``out += identity``, must not move them)."""
        nodes, last_use = self._nodes, self._last_use
        capture, keep = set(capture), set(keep)
        captured: dict[fx.Node, Any] = {}
        for i in range(start, stop):
            node = nodes[i]
            if node not in env or node.op == "placeholder":
                env[node] = self._eval_node(node, env)
            if node in capture:
                value = env[node]
                captured[node] = value.detach().clone() if isinstance(value, Tensor) else value
            for used in node.all_input_nodes:
                if last_use[used] <= i and used not in keep:
                    env.pop(used, None)
        env["__captured__"] = captured
        return env

    def split(self, x: Tensor, point: str) -> tuple[Tensor, Optional[tuple]]:
        """``(A_{≤p}(x), carry)``: the carry is ``None`` at a cut, else the tuple of tensors the rest of the
        network needs besides the point."""
        node = self._node(point)
        i, live = self._index[node], self._live[node]
        env = self._run({self._input: x}, 0, i + 1, keep=(node, *live))
        h = env[node]
        return h, (tuple(env[n] for n in live) if live else None)

    def forward_from(self, h: Tensor, point: str, carry: Optional[tuple] = None) -> Tensor:
        """B_{>p}(h): the rest of the network from ``h`` at ``point`` and the carry of :meth:`split`."""
        node = self._node(point)
        live = self._live[node]
        if live and carry is None:
            raise ValueError(f"{point!r} is not a cut ({', '.join(self._node_name[n] for n in live)} bypass it): "
                             "forward_from needs its carry, from split()")
        if not live and carry is not None:
            raise ValueError(f"{point!r} is a cut: nothing bypasses it, so there is no carry")
        env = {node: h, **dict(zip(live, carry or ()))}
        env = self._run(env, self._index[node] + 1, len(self._nodes))
        return env[self._nodes[-1]]

    def _outputs(self, x: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
        wanted = {p: self._node(p) for p in points}
        env = self._run({self._input: x}, 0, len(self._nodes), capture=wanted.values())
        return {p: env["__captured__"][n] for p, n in wanted.items()}

    def _all_outputs(self, x: Tensor) -> dict[str, Any]:
        env = self._run({self._input: x}, 0, len(self._nodes), capture=self._nodes)
        return {name: env["__captured__"].get(n) for name, n in self._by_name.items()}

    # ------------------------------------------------------------------ groups
    def _activation_of_node(self, node: fx.Node) -> Optional[str]:
        if node.op == "call_module":
            return _activation_module(self.model.get_submodule(str(node.target)))
        if node.op == "call_function":
            return ACTIVATION_FUNCTIONS.get(node.target)
        if node.op == "call_method":
            return ACTIVATION_METHODS.get(str(node.target))
        return None

    def _channelwise(self, node: fx.Node) -> Optional[tuple[str, bool]]:
        """``(description, commutes with negative scales)`` for a parameter-free channel-wise node, else None."""
        if node.op == "call_module":
            module = self.model.get_submodule(str(node.target))
            for cls, signed in CHANNELWISE_MODULES.items():
                if type(module) is cls:
                    return type(module).__name__, signed
        if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
            return node.target.__name__, CHANNELWISE_FUNCTIONS[node.target]
        return None

    def _group_source(self, point: str) -> tuple[Optional[str], str, list[str]]:
        node = self._node(point)
        op = _describe_op(node, self.model)
        through: list[str] = []
        while True:
            act = self._activation_of_node(node)
            if act is not None:
                if through and act in SIGNED_ACTIVATIONS and not all(s for _, s in through):
                    return None, op, [f"{t} after {act} does not commute with its negative scales" for t, s in through if not s]
                return act, op, [t for t, _ in through]
            step = self._channelwise(node)
            inputs = node.all_input_nodes
            if step is None or len(inputs) != 1:
                return None, op, []
            through.append(step)
            node = inputs[0]

    # ------------------------------------------------------------------ the weight-space action's neighbours
    def linear_neighbours(self, point: str) -> tuple[nn.Module, Optional[nn.Module], tuple[nn.Module, ...], nn.Module]:
        """``(layer, norm, between, next_layer)`` around an activation point: ``σ(norm(layer(h)))`` → the
        parameter-free modules ``between`` → ``next_layer``, where ``layer`` and ``next_layer`` are Conv or Linear
        modules, ``norm`` an optional BatchNorm, and every tensor on the way has exactly one reader. ValueError
        with the reason where the point is not of that form (a residual stream, a shared input, …)."""
        node = self._node(point)
        if self._activation_of_node(node) is None:
            raise ValueError(f"{point!r} is not the output of an activation")
        linear = (nn.Conv1d, nn.Conv2d, nn.Linear)

        def module(n: fx.Node) -> Optional[nn.Module]:
            return self.model.get_submodule(str(n.target)) if n.op == "call_module" else None

        def only_reader(n: fx.Node) -> fx.Node:
            users = list(n.users)
            if len(users) != 1:
                raise ValueError(f"{self._node_name[n]!r} is read by {len(users)} operations "
                                 f"({', '.join(self._node_name[u] for u in users)}): no single next layer absorbs g⁻¹")
            return users[0]

        (pre,) = node.all_input_nodes[:1] or [None]
        norm = None
        if pre is not None and isinstance(module(pre), nn.modules.batchnorm._BatchNorm):
            norm, pre = module(pre), pre.all_input_nodes[0]
        if pre is None or not isinstance(module(pre), linear):
            raise ValueError(f"{point!r}: the activation's input is not a convolution or Linear layer (optionally "
                             "followed by BatchNorm)")
        layer = module(pre)
        only_reader(pre)
        if norm is not None:
            only_reader(node.all_input_nodes[0])
        between: list[nn.Module] = []
        previous, current = node, only_reader(node)
        while not isinstance(module(current), linear):
            m = module(current)
            if m is None or type(m) not in CHANNELWISE_MODULES:
                raise ValueError(f"{point!r}: after the activation comes {_describe_op(current, self.model)}, not a "
                                 "convolution or Linear layer (or a parameter-free channel-wise module before one)")
            between.append(m)
            previous, current = current, only_reader(current)
        if not current.args or current.args[0] is not previous:
            raise ValueError(f"{point!r}: the next layer does not read the activation as its input")
        return layer, norm, tuple(between), module(current)


class HookedNet(GraphNet):
    """A model run with forward hooks, for models that torch.fx does not trace (data-dependent control flow).

    Points are the module names (``name_k`` for the k-th further call of a module called several times); cuts
    are not known, so every activation module is offered as a stitch point. ``split(x, p)`` runs the model up to
    the module and stops; its carry is the input ``x`` itself, and ``forward_from(h, p, (x,))`` runs the *whole*
    model on ``x`` with a hook that replaces the module's output by ``h`` (module docstring).

    Args:
        trace_error: why torch.fx did not trace the model (None: tracing was not asked for).
    """

    mode = "hooks"

    def __init__(self, model: nn.Module, *, trace_error: Optional[str] = None, **options: Any):
        super().__init__(model, **options)
        self.trace_error = trace_error
        modules = {name: m for name, m in model.named_modules() if name}
        self.__dict__["_modules_by_name"] = modules
        self.__dict__["_activation_modules"] = [name for name, m in modules.items() if _activation_module(m)]

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "trace_error": self.trace_error}

    @property
    def note(self) -> str:
        return f"forward hooks: {self.trace_error or 'not traced'}"

    # ------------------------------------------------------------------ names
    @property
    def points(self) -> tuple[str, ...]:
        """The module names."""
        return tuple(self._modules_by_name)

    @property
    def feature_points(self) -> tuple[str, ...]:
        return tuple(self._activation_modules)

    @property
    def stitch_points(self) -> tuple[str, ...]:
        """Every activation module (cuts are not known here)."""
        return tuple(self._activation_modules)

    @property
    def inner_points(self) -> tuple[str, ...]:
        return ()

    def is_cut(self, point: str) -> bool:
        return False

    def point_kind(self, point: str) -> str:
        return "point"

    def _hook_target(self, point: str) -> tuple[nn.Module, int]:
        """The module of ``point`` and which of its calls (``name_k``: call k)."""
        if point in self._modules_by_name:
            return self._modules_by_name[point], 0
        match = re.fullmatch(r"(.+)_(\d+)", point)
        if match and match.group(1) in self._modules_by_name:
            return self._modules_by_name[match.group(1)], int(match.group(2))
        raise self.unknown_point(point)

    def resolve(self, point: str) -> str:
        self._hook_target(point)
        return point

    # ------------------------------------------------------------------ running with hooks
    def split(self, x: Tensor, point: str) -> tuple[Tensor, tuple[Tensor]]:
        """``(A_{≤p}(x), (x,))``: the model runs up to the point's module and stops; the carry is the input."""
        return self._hook_outputs(x, [point], stop=True)[point], (x,)

    def forward_from(self, h: Tensor, point: str, carry: Optional[tuple] = None) -> Tensor:
        """B_{>p}(h): the whole model on the carry's input, the point's output replaced by ``h``."""
        if carry is None:
            raise ValueError(f"{point!r}: in hook mode forward_from needs the carry of split() (the input x): "
                             "the whole model runs again with the point's output replaced")
        return self._hook_replace(carry[0], point, h)

    def _outputs(self, x: Tensor, points: Sequence[str]) -> dict[str, Tensor]:
        return self._hook_outputs(x, points)

    def _all_outputs(self, x: Tensor) -> dict[str, Any]:
        return self._hook_outputs(x, [q for q in self.points if self._reached(q)], strict=False)

    def _hook_outputs(self, x: Tensor, points: Sequence[str], stop: bool = False,
                      strict: bool = True) -> dict[str, Tensor]:
        targets = {p: self._hook_target(p) for p in points}
        calls: dict[int, int] = {}
        found: dict[str, Tensor] = {}
        handles = []

        def hook(module, _inputs, out):
            k = calls.get(id(module), 0)
            calls[id(module)] = k + 1
            for p, (m, call) in targets.items():
                if m is module and call == k:
                    found[p] = out if stop or not isinstance(out, Tensor) else out.detach().clone()
            if stop and len(found) == len(targets):
                raise _Stop

        for module in {id(m): m for m, _ in targets.values()}.values():
            handles.append(module.register_forward_hook(hook))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [p for p in points if p not in found]
        if missing and strict:
            raise RuntimeError(f"points not reached in the forward pass: {', '.join(missing)}")
        return found

    def _hook_replace(self, x: Tensor, point: str, h: Tensor) -> Tensor:
        module, call = self._hook_target(point)
        calls = [0]

        def hook(_module, _inputs, out):
            k, calls[0] = calls[0], calls[0] + 1
            return h if k == call else None

        handle = module.register_forward_hook(hook)
        try:
            return self.model(x)
        finally:
            handle.remove()

    def _reached(self, point: str) -> bool:
        """Whether a module is called at all in the forward pass (containers such as ModuleList are not)."""
        module = self._modules_by_name[point]
        return type(module).forward is not nn.Module.forward and not isinstance(module, (nn.ModuleList, nn.ModuleDict))

    # ------------------------------------------------------------------ groups
    def _group_source(self, point: str) -> tuple[Optional[str], str, list[str]]:
        module, _ = self._hook_target(point)
        return _activation_module(module), type(module).__name__, []

    def linear_neighbours(self, point: str) -> tuple[nn.Module, Optional[nn.Module], tuple[nn.Module, ...], nn.Module]:
        raise ValueError("the weight-space action needs a traced graph; this model runs with forward hooks "
                         f"({self.trace_error or 'trace=False'})")


def _input_shape_of(model: nn.Module) -> tuple[int, ...]:
    """A batch shape the model takes: a patch embedding's own image size (timm ViTs built with ``img_size``), the
    model's ``pretrained_cfg["input_size"]`` (timm), else :data:`DEFAULT_INPUT_SHAPE`."""
    embed = getattr(model, "patch_embed", None)
    size, proj = getattr(embed, "img_size", None), getattr(embed, "proj", None)
    if size is not None and hasattr(proj, "in_channels"):
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (1, proj.in_channels, *size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return (1, *cfg["input_size"]) if "input_size" in cfg else DEFAULT_INPUT_SHAPE


def _activation_module(module: nn.Module) -> Optional[str]:
    for cls, name in ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return name
    return None


def _describe_op(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return type(model.get_submodule(str(node.target))).__name__
    if node.op in ("call_function", "call_method"):
        target = node.target
        return getattr(target, "__name__", str(target))
    return node.op


# ----------------------------------------------------------------------------------------------------------
# Any module as a network


def as_network(model: nn.Module, **kwargs: Any) -> PointNetwork:
    """A network (:func:`~symstitch.network.is_network`: the zoo's, a GraphNet, one of your own) as is; any other
    ``nn.Module`` wrapped in a GraphNet (``kwargs``: its options)."""
    if is_network(model):
        if kwargs:
            raise ValueError(f"{type(model).__name__} takes no GraphNet options")
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return GraphNet(model, **kwargs)


__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "ACTIVATION_MODULES",
    "CLASS_TOKEN_MODES",
    "GraphNet",
    "HookedNet",
    "PointInfo",
    "TraceError",
    "TracedNet",
    "as_network",
]
