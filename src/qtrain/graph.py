"""The channel graph of a model, and channel removal in place.

A *channel group* is a set of channels that go together: the output channels of a conv/linear
layer (its *producer*), the per-channel norms applied to them, and the input channels of the
layers that read them (the *consumers*). A residual addition ties the groups of its operands
into one: their channels are added one to one, so channel k goes from every producer at once.

``channel_groups`` finds the groups on a torch.fx trace; ``remove_channels`` slices a group's
parameters, buffers and optimizer state in place, so that training goes on exactly as if the
removed weights had been zero and stayed zero (self-compressing networks drop the channels
whose bits reach zero; cross-layer equalization rescales a group's channels).

Example:
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> hidden, last = channel_groups(model)
    >>> hidden.producers, hidden.norms, hidden.consumers, hidden.channels, hidden.removable
    (('0',), ('1',), ('3',), 4, True)
    >>> last.reason
    'reaches the model output'
    >>> remove_channels(model, None, hidden, torch.tensor([0, 2])).channels
    2
    >>> model[1].num_features, model[3]
    (2, Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1)))
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import operator
from collections.abc import Iterator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["ChannelGroup", "GraphError", "channel_groups", "remove_channels"]

_GEMMS = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Ops that map each channel on its own, keeping the tensor's layout: a function's target, or a
# method's name.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
)
_ELEMENTWISE_OPS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    "relu",
    "relu_",
    F.relu6,
    F.leaky_relu,
    F.leaky_relu_,
    F.gelu,
    F.silu,
    F.dropout,
}
_SCALINGS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}  # by a Python number
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}  # x / number
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
_POOL_OPS = {F.max_pool2d, F.avg_pool2d}
_ADAPTIVE_POOL_OPS = {F.adaptive_max_pool2d, F.adaptive_avg_pool2d}
_FLATTENS = {torch.flatten, "flatten"}
# Ops that add channel k of one operand to channel k of the other: they tie two groups.
_TIES = {operator.add, operator.iadd, torch.add, "add", "add_"}
_TIES |= {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_SHAPE_QUERIES = {"size", "dim", getattr}
_LEAVES = _GEMMS + _NORMS + _ELEMENTWISE_MODULES + _POOL_MODULES + (nn.Flatten,)
# A layer's input observer (qtrain.nn) measures its input: its tensors follow the input channels.
_INPUT_OBSERVER = "observers.input."


class GraphError(ValueError):
    """A model the channel graph cannot be found for, or a removal it refuses."""


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together; names are qualified module names.

    Args:
        producers: conv/linear layers whose output channels these are (more than one when a
            residual addition ties them).
        norms: per-channel norms (BatchNorm, subclasses included) applied to these channels.
        consumers: conv/linear layers whose input channels (dim 1 of the weight) these are.
        channels: the current channel count.
        removable: False when the channels reach the model output, pass an op the walk does
            not follow, or feed a layer whose input it cannot slice; ``reason`` says which.
        reason: why not removable ("" when removable).
    """

    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[str, ...]
    channels: int
    removable: bool
    reason: str = ""


class _Layout(enum.Enum):
    """Where a group's channels sit in a value, as far as module types tell without shapes."""

    MAP = "(N, C, *spatial)"  # a conv's output
    POOLED = "(N, C, 1, 1)"  # after adaptive pooling to 1
    VECTOR = "(N, C)"
    LAST = "(..., C)"  # a linear's output, on an input of unknown rank


@dataclasses.dataclass
class _Group:
    """A group while the walk runs; ``reasons`` empty: removable."""

    channels: int
    producers: list[str] = dataclasses.field(default_factory=list)
    norms: list[str] = dataclasses.field(default_factory=list)
    consumers: list[str] = dataclasses.field(default_factory=list)
    reasons: list[str] = dataclasses.field(default_factory=list)


class _Tracer(torch.fx.Tracer):
    """Keeps the layers the walk knows as single nodes, subclasses (qtrain.nn, qtrain.range_bn,
    qtrain.compact) included."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, _LEAVES) or super().is_leaf_module(module, qualified_name)


def channel_groups(
    model: nn.Module, example_input: torch.Tensor | None = None
) -> list[ChannelGroup]:
    """The channel groups of ``model``, in module order of their first producer.

    Found on a torch.fx trace. From each conv (``groups == 1``) or linear layer's output, the
    channels are followed through per-channel ops: BatchNorm (recorded in ``norms``), ReLU,
    ReLU6, LeakyReLU, GELU, SiLU, Identity, Dropout (modules, functions, in place too), 2-d
    max/average pooling and adaptive pooling, multiplication or division by a Python number,
    and ``flatten(1)`` of a map whose spatial size is 1×1. They end in a conv/linear layer that
    reads them (a consumer). An addition or subtraction of two tensors ties their groups into
    one. A group is not removable when its channels reach the model output, are concatenated
    (``torch.cat``), reshaped, added to a tensor of no group, or used by any other op; when a
    linear reads a flattened H×W map with H·W > 1; or when a grouped conv produces or reads
    them. A layer called twice ties the groups it reads or writes. The model's input channels
    are no group.

    Args:
        model: a module torch.fx can trace.
        example_input: a batch for shape propagation, run on a copy of the model in eval mode;
            needed only where layer types do not tell the layout (a flatten of a conv map not
            pooled to 1×1, a norm or flatten after a linear layer on an input of unknown rank).

    Raises:
        GraphError: the model cannot be traced, or shapes are needed and no example input
            was given.
    """
    if example_input is not None:
        model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001  (fx raises many kinds for untraceable code)
        raise GraphError(
            f"channel_groups needs a torch.fx trace of {type(model).__name__}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if example_input is not None:
        try:
            with torch.no_grad():
                ShapeProp(torch.fx.GraphModule(model, graph)).propagate(example_input)
        except Exception as err:  # noqa: BLE001  (whatever the model raises)
            raise GraphError(
                f"channel_groups could not run {type(model).__name__} on example_input: {err}"
            ) from err
    walk = _Walk(model, has_shapes=example_input is not None)
    for node in graph.nodes:
        walk.visit(node)
    return walk.groups()


class _Walk:
    """One pass over the graph's nodes in order: which group (and layout) each value carries,
    with a union-find over groups for ties."""

    def __init__(self, model: nn.Module, has_shapes: bool) -> None:
        self.model_name = type(model).__name__
        self.modules = dict(model.named_modules())
        self.order = {name: i for i, name in enumerate(self.modules)}
        self.has_shapes = has_shapes
        self.records: list[_Group] = []
        self.parent: list[int] = []
        self.carried: dict[torch.fx.Node, tuple[int, _Layout]] = {}
        self.attached: dict[tuple[str, str], int] = {}  # (role, module name) → group

    # ---- union-find -----------------------------------------------------------------------
    def find(self, group: int) -> int:
        while self.parent[group] != group:
            group = self.parent[group]
        return group

    def union(self, first: int, second: int) -> int:
        root, other = sorted((self.find(first), self.find(second)))
        if root != other:
            self.parent[other] = root
            kept, merged = self.records[root], self.records[other]
            if kept.channels != merged.channels:
                kept.reasons.append(f"ties {kept.channels} to {merged.channels} channels")
            for field in ("producers", "norms", "consumers", "reasons"):
                getattr(kept, field).extend(getattr(merged, field))
        return root

    def attach(self, role: str, name: str, group: int) -> int:
        """Record module ``name`` in ``role`` of ``group``; a module met again ties groups."""
        if (role, name) in self.attached:
            return self.union(self.attached[role, name], group)
        self.attached[role, name] = group
        getattr(self.records[self.find(group)], role).append(name)
        return group

    def refuse(self, group: int, reason: str) -> None:
        self.records[self.find(group)].reasons.append(reason)

    # ---- the walk -------------------------------------------------------------------------
    def visit(self, node: torch.fx.Node) -> None:
        carried = {arg: self.carried[arg] for arg in node.all_input_nodes if arg in self.carried}
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        op = _op(node)
        if isinstance(module, _GEMMS):
            self.gemm(node, module, carried)
        elif not carried or op in _SHAPE_QUERIES:
            return
        elif node.op == "output":
            for group, _ in carried.values():
                self.refuse(group, "reaches the model output")
        elif op in _TIES:
            self.tie(node, carried)
        else:
            passed = None
            if len(carried) == 1:
                ((arg, (group, layout)),) = carried.items()
                passed = self.follow(node, module, arg, layout)
            if isinstance(passed, _Layout):
                if isinstance(module, _NORMS):
                    group = self.attach("norms", str(node.target), group)
                self.carried[node] = (group, passed)
                return
            for group, _ in carried.values():
                self.refuse(group, passed or f"used by {_describe(node, module)}")

    def gemm(
        self,
        node: torch.fx.Node,
        module: nn.Module,
        carried: dict[torch.fx.Node, tuple[int, _Layout]],
    ) -> None:
        name = str(node.target)
        grouped = getattr(module, "groups", 1) != 1
        for group, layout in carried.values():
            if grouped:
                self.refuse(group, f"read by grouped convolution {name!r}")
            elif isinstance(module, nn.Conv2d) and layout not in (_Layout.MAP, _Layout.POOLED):
                self.refuse(group, f"read by conv {name!r} from a {layout.value} tensor")
            elif isinstance(module, nn.Linear) and layout not in (_Layout.VECTOR, _Layout.LAST):
                self.refuse(group, f"read by linear {name!r} over the last dim of a map")
            else:
                self.attach("consumers", name, group)
        if ("producers", name) in self.attached:
            group = self.attached["producers", name]
        else:
            group = len(self.records)
            self.records.append(_Group(module.weight.shape[0]))
            self.parent.append(group)
            self.attach("producers", name, group)
            if grouped:
                self.refuse(group, f"produced by grouped convolution {name!r}")
        self.carried[node] = (group, self.output_layout(node, module))

    def output_layout(self, node: torch.fx.Node, module: nn.Module) -> _Layout:
        if isinstance(module, nn.Conv2d):
            return _Layout.MAP
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            return _Layout.LAST
        vector = source in self.carried and self.carried[source][1] is _Layout.VECTOR
        return _Layout.VECTOR if vector or _flattens(source, self.modules) else _Layout.LAST

    def tie(self, node: torch.fx.Node, carried: dict[torch.fx.Node, tuple[int, _Layout]]) -> None:
        others = [arg for arg in node.all_input_nodes if arg not in carried]
        layouts = {layout for _, layout in carried.values()}
        groups = [group for group, _ in carried.values()]
        if others:
            reason = f"added to {others[0].name!r}, a tensor of no channel group"
        elif len(layouts) > 1:
            reason = f"added across layouts {sorted(layout.value for layout in layouts)}"
        else:
            root = groups[0]
            for group in groups[1:]:
                root = self.union(root, group)
            self.carried[node] = (root, layouts.pop())
            return
        for group in groups:
            self.refuse(group, reason)

    def follow(
        self, node: torch.fx.Node, module: nn.Module | None, arg: torch.fx.Node, layout: _Layout
    ) -> _Layout | str | None:
        """The layout after ``node`` if it keeps each channel apart, else a reason (or None:
        an op the walk does not know)."""
        op = _op(node)
        number = any(isinstance(a, int | float) and not isinstance(a, bool) for a in node.args)
        if isinstance(module, _ELEMENTWISE_MODULES) or op in _ELEMENTWISE_OPS:
            return layout
        if number and len(node.args) == 2 and (op in _SCALINGS or op in _DIVISIONS):
            return layout if op in _SCALINGS or node.args[0] is arg else None
        if isinstance(module, _NORMS):
            first = self.channels_first(node, arg, layout)
            return first or f"normalised by {_describe(node, module)} over a dim not channels"
        if isinstance(module, _POOL_MODULES) or op in _POOL_OPS | _ADAPTIVE_POOL_OPS:
            if layout not in (_Layout.MAP, _Layout.POOLED):
                return f"pooled by {_describe(node, module)} from a {layout.value} tensor"
            output_size = getattr(module, "output_size", None)
            if op in _ADAPTIVE_POOL_OPS:
                output_size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
            return _Layout.POOLED if _is_one(output_size) else _Layout.MAP
        if _flattens(node, self.modules):
            return self.flattened(node, arg, layout)
        return None

    def channels_first(
        self, node: torch.fx.Node, arg: torch.fx.Node, layout: _Layout
    ) -> _Layout | None:
        """``layout`` where the channels are dim 1 (a linear's (N, C) output), else None."""
        if layout is not _Layout.LAST:
            return layout
        return _Layout.VECTOR if len(self.shape(node, arg)) == 2 else None

    def flattened(self, node: torch.fx.Node, arg: torch.fx.Node, layout: _Layout) -> _Layout | str:
        if layout in (_Layout.POOLED, _Layout.VECTOR):
            return _Layout.VECTOR
        shape = self.shape(node, arg)
        if layout is _Layout.LAST and len(shape) == 2:
            return _Layout.VECTOR
        if layout is _Layout.MAP and math.prod(shape[2:]) == 1:
            return _Layout.VECTOR
        return f"flattened at {node.name!r} from shape {tuple(shape)} (channel dim not kept)"

    def shape(self, node: torch.fx.Node, arg: torch.fx.Node) -> torch.Size:
        if not self.has_shapes:
            raise GraphError(
                f"channel_groups({self.model_name}): whether {node.name!r} keeps the channels "
                "of its input depends on its shape; pass example_input"
            )
        return arg.meta["tensor_meta"].shape

    def groups(self) -> list[ChannelGroup]:
        def ordered(names: list[str]) -> tuple[str, ...]:
            return tuple(sorted(set(names), key=self.order.__getitem__))

        found = []
        for record in (r for i, r in enumerate(self.records) if self.find(i) == i):
            reason = "; ".join(dict.fromkeys(record.reasons))
            found.append(
                ChannelGroup(
                    producers=ordered(record.producers),
                    norms=ordered(record.norms),
                    consumers=ordered(record.consumers),
                    channels=record.channels,
                    removable=not reason,
                    reason=reason,
                )
            )
        return sorted(found, key=lambda group: self.order[group.producers[0]])


def _op(node: torch.fx.Node) -> object:
    """A function node's target, a method node's name; None for other nodes."""
    return node.target if node.op in ("call_function", "call_method") else None


def _flattens(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` flattens dims 1 to last (``nn.Flatten()``, ``x.flatten(1)``,
    ``torch.flatten(x, 1)``)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1)
    if _op(node) not in _FLATTENS:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


def _is_one(size: object) -> bool:
    return size == 1 or (isinstance(size, tuple | list) and all(s == 1 for s in size))


def _describe(node: torch.fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"{type(module).__name__} {str(node.target)!r}"
    target = getattr(node.target, "__name__", node.target)  # a method node's target: its name
    return f"{target} at {node.name!r}"


# ---- removal ------------------------------------------------------------------------------


@torch.no_grad()
def remove_channels(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    group: ChannelGroup,
    keep: torch.Tensor,
) -> ChannelGroup:
    """Keep only the channels ``keep`` of ``group``, in place; returns the updated group.

    Producers: every tensor of the layer, its submodules' included (parameters and buffers,
    e.g. bias, per-channel weight scales, learned per-channel bits of shape (C, 1, 1, 1)),
    whose dim 0 is the channel count is per-channel and sliced along dim 0 — except per-tensor
    ones (one element) and those of its input observer, which follow its input channels.
    Norms: every tensor whose dim 0 is the channel count (weight, bias, running statistics,
    an input observer's). Consumers: the weight along dim 1, and their input observer's
    per-channel tensors.
    Parameters keep their identity (their ``.data`` and ``.grad`` are sliced), so optimizer
    groups stay valid; each optimizer state tensor of a parameter's old shape (momentum, Adam's
    moments) is sliced alike, step counts stay. ``out_channels``/``out_features``,
    ``in_channels``/``in_features`` and ``num_features`` follow. With the removed channels'
    contributions zero, the model's outputs and the next optimizer steps of what is kept are
    those of the model before removal.

    Args:
        model: the model ``group`` was found on (``channel_groups``).
        optimizer: the optimizer over its parameters, or None.
        group: a removable group at its current channel count (the group this function
            returned last time, or ``channel_groups`` again).
        keep: a bool mask of shape (channels,), or the indices of the channels to keep.

    Raises:
        GraphError (a ValueError): the group is not removable, stale, or ``keep`` would remove
            every channel (a group keeps at least one: drop the layers instead) or is malformed.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> hidden = channel_groups(model)[0]
    >>> _ = remove_channels(model, None, hidden, torch.tensor([True, False, True, False]))
    >>> model
    Sequential(
      (0): Linear(in_features=3, out_features=2, bias=True)
      (1): ReLU()
      (2): Linear(in_features=2, out_features=2, bias=True)
    )
    """
    if not group.removable:
        raise GraphError(f"the channels of {', '.join(group.producers)} stay: {group.reason}")
    index = _kept_indices(group, keep)
    for names, dim in ((group.producers, 0), (group.consumers, 1)):
        for name in names:
            found = model.get_submodule(name).weight.shape[dim]
            if found != group.channels:
                raise GraphError(
                    f"stale group: it has {group.channels} channels, {name!r} has {found}; use "
                    "the group remove_channels returned, or channel_groups again"
                )
    sliced: set[tuple[int, int]] = set()  # (tensor id, dim): a shared tensor is sliced once

    def slice_(tensor: torch.Tensor, dim: int) -> None:
        if (id(tensor), dim) not in sliced:
            sliced.add((id(tensor), dim))
            _slice(tensor, dim, index, optimizer)

    def per_channel(module: nn.Module, of_input: bool | None) -> list[torch.Tensor]:
        """The module's per-channel tensors: those of its input observer (of_input), the
        others (not of_input), or all (None: a norm's input and output channels are one)."""
        return [
            tensor
            for name, tensor in _tensors(module)
            if tensor.dim() > 0
            and tensor.shape[0] == group.channels
            and tensor.numel() > 1
            and of_input in (None, name.startswith(_INPUT_OBSERVER))
        ]

    counts = ("out_channels", "out_features", "num_features")
    for names, of_input in ((group.producers, False), (group.norms, None)):
        for name in names:
            module = model.get_submodule(name)
            for tensor in per_channel(module, of_input):
                slice_(tensor, 0)
            _set_counts(module, counts, len(index))
    for name in group.consumers:
        module = model.get_submodule(name)
        slice_(module.weight, 1)
        for tensor in per_channel(module, of_input=True):
            slice_(tensor, 0)
        _set_counts(module, ("in_channels", "in_features"), len(index))
    return dataclasses.replace(group, channels=len(index))


def _set_counts(module: nn.Module, attributes: tuple[str, ...], count: int) -> None:
    for attribute in attributes:
        if hasattr(module, attribute):
            setattr(module, attribute, count)


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _kept_indices(group: ChannelGroup, keep: torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep)
    if keep.dtype == torch.bool:
        if tuple(keep.shape) != (group.channels,):
            raise GraphError(
                f"keep: a mask must have shape ({group.channels},), got {tuple(keep.shape)}"
            )
        index = keep.nonzero().flatten()
    elif keep.dim() == 1 and not (keep.is_floating_point() or keep.is_complex()):
        index = keep.long().sort().values
        if index.numel() and not 0 <= index[0] <= index[-1] < group.channels:
            raise GraphError(f"keep: indices must lie in 0..{group.channels - 1}, got {keep}")
        if index.unique().numel() != index.numel():
            raise GraphError(f"keep: indices must be distinct, got {keep}")
    else:
        raise GraphError(f"keep must be a bool mask or 1-d integer indices, got {keep}")
    if index.numel() == 0:
        raise GraphError(
            f"keep would remove all {group.channels} channels of {', '.join(group.producers)}; "
            "a group keeps at least one channel"
        )
    return index


def _slice(
    tensor: torch.Tensor, dim: int, index: torch.Tensor, optimizer: torch.optim.Optimizer | None
) -> None:
    old_shape = tensor.shape
    index = index.to(tensor.device)
    tensor.data = tensor.data.index_select(dim, index)
    if not isinstance(tensor, nn.Parameter):
        return
    if tensor.grad is not None:
        tensor.grad = tensor.grad.index_select(dim, index)
    state = optimizer.state.get(tensor, {}) if optimizer is not None else {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old_shape:
            state[key] = value.index_select(dim, index)
