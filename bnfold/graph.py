"""The only module that knows ONNX protobuf details.

`ModelIndex` walks a model's main graph and every subgraph (If / Loop / Scan bodies) once and builds
a `GraphIndex` per graph: producer and consumer of each value (a node whose subgraph reads an outer
value counts as a consumer of it), constants (initializer, Constant node, through Identity, or a
small subgraph of constants evaluated once), graph I/O tests, unique names. Edits go through the
index so it stays current without rescans; removed nodes are dropped from each graph in one sweep
at `finish()`, which also drops what the edits orphaned (initializers, Identity/Constant chains,
stale value_info) and nothing else.
"""

from __future__ import annotations

import itertools
import pathlib
from collections import defaultdict

import numpy as np
import onnx

from bnfold.readiness import Readiness
from bnfold.tensors import ONNX_DTYPES, decode_tensor, encode_tensor, little_endian

# Ops that are pure functions of their inputs and small enough to evaluate at fold time when all
# their inputs are constant: what exporters use to build a bias (dynamo with optimize=False builds
# Conv biases from Expand/CastLike/Shape of constants).
CONSTANT_FOLDABLE_OPS = frozenset(
    {
        "Identity", "Constant", "Cast", "CastLike", "Shape", "Size", "Expand", "Reshape", "Squeeze",
        "Unsqueeze", "Concat", "Gather", "Slice", "Transpose", "Add", "Sub", "Mul", "Div", "Neg",
        "Sqrt", "Reciprocal", "ConstantOfShape", "Range", "Flatten",
    }
)
# Ops whose result depends only on an input's static dtype/shape (the input named here), so a
# fold that keeps dtype and shape cannot change what they compute.
METADATA_OPS = frozenset({"Shape", "Size", "CastLike"})
MAX_CONSTANT_DEPTH = 16
# Initializer values from this size on are not memoised: a weight is read by the one fold that
# replaces it, and keeping every weight decoded would hold the model twice in memory.
MAX_MEMO_BYTES = 2**20
# Elements a constant evaluation may produce beyond what its inputs already hold: BN parameters
# and biases have one per channel; a ConstantOfShape([2**32]) is not fold material.
MAX_CONSTANT_GROWTH = 2**22
_UNKNOWN = object()
_EXTERNAL = onnx.TensorProto.EXTERNAL
_UNCACHED = object()
_TOO_DEEP = object()
DEFAULT_DOMAINS = ("", "ai.onnx")


def _domain(domain: str) -> str:
    """"ai.onnx" is the default domain's full name: one key for both spellings."""
    return "" if domain in DEFAULT_DOMAINS else domain


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in reports: its name, else op and first output."""
    if node.name:
        return node.name
    return f"{node.op_type}({node.output[0] if node.output else ''})"


def _subgraphs(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _has_subgraph(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH or attr.type == onnx.AttributeProto.GRAPHS:
            return True
    return False


def _outer_names_read(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads that it does not define itself (implicit inputs)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n)
        for _, sub in _subgraphs(node):
            read |= _outer_names_read(sub)
        defined.update(node.output)
    read.update(o.name for o in graph.output)
    return read - defined


def names_read(node: onnx.NodeProto):
    """The values `node` reads: its inputs, and what its subgraphs read from outside them."""
    reads = [name for name in node.input if name]
    if _has_subgraph(node):
        reads += [name for _, sub in _subgraphs(node) for name in _outer_names_read(sub)]
    return reads


class ModelIndex:
    """Indexes of every graph of a model, plus what they share (names, opsets, tensor reader)."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | pathlib.Path | None = None, spill=None):
        self.model = model
        self.base_dir = pathlib.Path(base_dir) if base_dir is not None else None
        self.spill = spill  # bnfold.loading.Spill: where big new tensors go (lazy loads), or None
        self.readiness = Readiness()  # what the folds wrote, for quantization (rules.base.apply_new_tensors)
        self.opsets = {_domain(o.domain): o.version for o in model.opset_import}
        self.names: set[str] = set()
        self._counter = itertools.count()
        self._types: dict[str, tuple[int, tuple | None]] | None = None
        self._inferred = False
        self.graphs: list[GraphIndex] = []
        self._walk(model.graph, "", None)

    def _walk(self, graph: onnx.GraphProto, path: str, outer: GraphIndex | None) -> None:
        index = GraphIndex(self, graph, path, outer)
        self.graphs.append(index)
        if outer is not None:
            outer.children.append(index)
        for node in index.holders:
            for attr_name, sub in _subgraphs(node):
                self._walk(sub, f"{path}{node_label(node)}/{attr_name}/", index)

    def opset(self, domain: str = "") -> int:
        return self.opsets.get(_domain(domain), 0)

    def unique_name(self, base: str) -> str:
        """A value name used nowhere in the model (subgraphs included), derived from `base`."""
        name = base
        while name in self.names:
            name = f"{base}_{next(self._counter)}"
        self.names.add(name)
        return name

    def read_tensor(self, tensor: onnx.TensorProto) -> np.ndarray | None:
        """Decode an initializer; None when its external data is not reachable."""
        if tensor.data_location == _EXTERNAL:
            spilled = self.spill.find(tensor) if self.spill is not None else None
            if spilled is not None:
                return self.spill.read(tensor, spilled)
            if self.base_dir is None:
                return None
            from bnfold.external import read_tensor

            return read_tensor(tensor, self.base_dir)
        return decode_tensor(tensor)

    def value_type(self, name: str) -> tuple[int, tuple | None] | None:
        """(elem_type, dims) of a value from the model's type info, dims None where unknown;
        ONNX shape inference runs once, only when a value has no declared type."""
        if self._types is None:
            self._types = _declared_types(self.model)
        if name not in self._types and not self._inferred:
            self._inferred = True
            for graph in self.graphs:  # inference reads nodes in order: nodes added by a fold
                graph._place_added_nodes()  # (appended) go where they belong first
            for key, value in _inferred_types(self.model).items():
                self._types.setdefault(key, value)
        return self._types.get(name)

    def rank(self, name: str) -> int | None:
        found = self.value_type(name)
        return None if found is None or found[1] is None else len(found[1])

    def finish(self) -> None:
        for index in self.graphs:
            index.finish()

    def release(self) -> None:
        """Drop the graph indexes, breaking their references to this index and to each other
        (graph -> model, parent <-> subgraph): cycles, which only Python's cycle collector would
        free. What the model index itself keeps (opsets, names) stays readable."""
        for index in self.graphs:
            index.children.clear()
            index.outer = None
        self.graphs.clear()


def _type_of(value_info: onnx.ValueInfoProto) -> tuple[int, tuple | None] | None:
    t = value_info.type
    if not t.HasField("tensor_type"):
        return None
    if not t.tensor_type.HasField("shape"):
        return t.tensor_type.elem_type, None
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)
    return t.tensor_type.elem_type, dims


def _declared_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    types: dict[str, tuple[int, tuple | None]] = {}

    def visit(graph):
        for vi in itertools.chain(graph.input, graph.output, graph.value_info):
            found = _type_of(vi)
            if found is not None:
                types[vi.name] = found
        for t in graph.initializer:
            types[t.name] = (t.data_type, tuple(t.dims))
        for node in graph.node:
            for _, sub in _subgraphs(node):
                visit(sub)

    visit(model.graph)
    return types


def _inferred_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort; an unknown type only means "keep"
        return {}
    return _declared_types(inferred)


class GraphIndex:
    """Producer/consumer/constant index of one graph, kept current by the edit methods."""

    def __init__(self, model: ModelIndex, graph: onnx.GraphProto, path: str, outer: GraphIndex | None):
        self.model = model
        self.graph = graph
        self.path = path
        self.outer = outer
        self.nodes = list(graph.node)
        self.removed: set[int] = set()
        self.after: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (added node, node it follows)
        self.children: list[GraphIndex] = []  # indexes of the subgraphs of this graph's nodes
        self.holders: list[onnx.NodeProto] = []  # nodes with subgraphs
        self.orphan_candidates: set[str] = set()
        self.gone_names: set[str] = set()
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self._constants: dict[str, tuple[np.ndarray, int] | None] = {}  # see _constant
        self._too_deep: dict[str, int] = {}  # name -> largest budget its subgraph exceeded
        self.site_aliases: dict[str, str] = {}  # fold site -> where it is compared now (moved_sites)
        self._index_nodes()

    def _index_nodes(self) -> None:
        """One pass over the nodes (protobuf field access is the cost here: each read once)."""
        names = self.model.names
        names.update(self.inputs, self.initializers, self.outputs)
        producer, consumers = self.producer, self.consumers
        for node in self.nodes:
            for name in node.output:
                producer[name] = node
            reads = node.input
            if _has_subgraph(node):
                self.holders.append(node)
                reads = [*reads, *(name for _, sub in _subgraphs(node) for name in _outer_names_read(sub))]
            for name in reads:  # a node reading a name twice is listed once
                users = consumers[name]
                if not users or users[-1] is not node:
                    users.append(node)
        names.update(producer)
        producer.pop("", None)
        consumers.pop("", None)
        names.discard("")

    # --- queries -------------------------------------------------------------------------------

    def live_nodes(self):
        return [n for n in self.nodes if id(n) not in self.removed]

    def users(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, ()) if id(n) not in self.removed]

    def is_used(self, name: str) -> bool:
        removed = self.removed
        for node in self.consumers.get(name, ()):
            if id(node) not in removed:
                return True
        return False

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def is_overridable(self, name: str) -> bool:
        """An initializer also listed as a graph input is only a default value (IR < 4)."""
        return name in self.inputs

    def describe_source(self, name: str) -> str:
        """Where a value comes from, for reasons: "Relu 'relu_3'", "graph input 'x'", ..."""
        node = self.producer.get(name)
        if node is not None:
            return f"{node.op_type} '{node_label(node)}'"
        if name in self.inputs and name in self.initializers:
            return f"graph input '{name}', an initializer a caller may override (--freeze-initializer-inputs folds it)"
        if name in self.inputs:
            return f"graph input '{name}'"
        if name in self.initializers:
            return f"initializer '{name}'"
        if self.outer is not None:
            return f"outer-scope value '{name}'"
        return f"undefined value '{name}'"

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is a constant the fold may rely on, else None."""
        known = self._constants.get(name, _UNKNOWN)
        if known.__class__ is tuple:  # whatever is known was found within the full depth
            return known[0]
        if known is _UNKNOWN:
            tensor = self.initializers.get(name)
            if tensor is not None and name not in self.inputs:  # not overridable (see is_overridable)
                return self._initializer_constant(name, tensor)  # the common case, without the walk
        found = self._constant(name, MAX_CONSTANT_DEPTH)
        return found[0] if isinstance(found, tuple) else None

    def _constant(self, name: str, budget: int):
        """(value, height) of constant `name`, None if it is not one, or _TOO_DEEP when its
        constant subgraph is higher than `budget` nodes.

        Memoised per value (a shared input is evaluated once, however many nodes read it). The
        height (0 for an initializer or Constant, else 1 + its highest input) is intrinsic, so
        the answer does not depend on which query reached a value first.
        """
        if not name or self.is_overridable(name):
            return None
        known = self._constants.get(name, _UNKNOWN)
        if known is not _UNKNOWN:
            return known if known is None or known[1] <= budget else _TOO_DEEP
        if budget < 0 or self._too_deep.get(name, -1) >= budget:
            return _TOO_DEEP
        found = self._lookup_constant(name, budget)
        if found is _TOO_DEEP:
            self._too_deep[name] = budget
        elif found is not None and found[0] is _UNCACHED:
            return found[1], 0
        else:
            self._constants[name] = found
        return found

    def _initializer_constant(self, name: str, tensor: onnx.TensorProto) -> np.ndarray | None:
        """An initializer's value, memoised when small (see MAX_MEMO_BYTES)."""
        value = self.model.read_tensor(tensor)
        if value is None or value.nbytes < MAX_MEMO_BYTES:
            self._constants[name] = None if value is None else (value, 0)
        return value

    def _lookup_constant(self, name: str, budget: int):
        if name in self.initializers:
            value = self.model.read_tensor(self.initializers[name])
            if value is not None and value.nbytes >= MAX_MEMO_BYTES:
                return _UNCACHED, value
            return None if value is None else (value, 0)
        node = self.producer.get(name)
        if node is None:
            value = self.outer.constant(name) if self.outer is not None else None
            return None if value is None else (value, 0)
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in CONSTANT_FOLDABLE_OPS or name != node.output[0]:
            return None
        if node.op_type == "Constant":
            value = _constant_node_value(node)
            return None if value is None else (value, 0)
        if node.op_type in ("Shape", "Size"):
            value = self._metadata_constant(node)
            return None if value is None else (value, 0)
        inputs = node.input[:1] if node.op_type == "CastLike" else node.input
        found = [self._constant(i, budget - 1) if i else (None, -1) for i in inputs]
        if any(f is None for f in found):
            return None
        if any(f is _TOO_DEEP for f in found):
            return _TOO_DEEP
        height = 1 + max((h for _, h in found), default=0)
        if node.op_type == "CastLike":
            value = self._cast_like(node, found[0][0])
        else:
            value = _evaluate_bounded(node, [v for v, _ in found], self.model.opset(""))
        return None if value is None else (value, height)

    def _cast_like(self, node: onnx.NodeProto, value: np.ndarray) -> np.ndarray | None:
        """CastLike reads only the static dtype of its target (input 1), not its contents."""
        found = self.model.value_type(node.input[1])
        if found is None or not found[0]:
            return None
        return value.astype(onnx.helper.tensor_dtype_to_np_dtype(found[0]))

    def _metadata_constant(self, node: onnx.NodeProto) -> np.ndarray | None:
        """Shape / Size read only the static shape of a value, not its contents."""
        found = self.model.value_type(node.input[0])
        dims = None if found is None else found[1]
        if node.op_type == "Size":
            return None if dims is None or None in dims else np.array(int(np.prod(dims)), np.int64)
        start, end = attribute(node, "start", 0), attribute(node, "end", None)
        picked = None if dims is None else dims[slice(start, end)]
        return None if picked is None or None in picked else np.array(picked, np.int64)

    # --- edits ---------------------------------------------------------------------------------

    def set_constant_input(self, node: onnx.NodeProto, position: int, value: np.ndarray, base: str) -> str:
        """Point input `position` of `node` at an initializer holding `value`; returns its name.

        A new initializer, since the old tensor may be shared with other nodes, which must not
        see the change (the old input becomes an orphan candidate, dropped at finish() if
        unused), unless `node` alone can see the old one (`_owned_by`): then it is overwritten.
        """
        old = node.input[position] if position < len(node.input) else ""
        if old and self._owned_by(old, node, value):
            self._overwrite_initializer(old, value)
            return old
        name = self._add_initializer(value, base)
        while len(node.input) <= position:
            node.input.append("")
        self.set_input(node, position, name)
        return name

    def _owned_by(self, name: str, node: onnx.NodeProto, value: np.ndarray) -> bool:
        """Whether initializer `name` may be overwritten with `value` for `node`: an embedded
        tensor of value's dtype and shape (so declared types stay true) that only `node` reads,
        once, and that nothing else can see (no graph input or output, no subgraph, no lazy-load
        stub, no spill). Overwriting spares a new initializer and the old one's removal."""
        tensor = self.initializers.get(name)
        if tensor is None or tensor.data_location == _EXTERNAL or name in self.inputs or name in self.outputs:
            return False
        if tensor.data_type != ONNX_DTYPES.get(value.dtype) or tuple(tensor.dims[:]) != value.shape or self.model.spill is not None:
            return False
        users = self.consumers.get(name, ())
        if len(users) != 1 or users[0] is not node or node.input[:].count(name) != 1:
            return False
        return not (self.children and self.read_by_subgraph(name))

    def _overwrite_initializer(self, name: str, value: np.ndarray) -> None:
        tensor = self.initializers[name]
        doc = tensor.doc_string
        tensor.Clear()
        encode_tensor(value, name, tensor)
        tensor.doc_string = doc
        if value.nbytes < MAX_MEMO_BYTES:
            self._constants[name] = (value, 0)
        else:
            self._constants.pop(name, None)

    def _add_initializer(self, value: np.ndarray, base: str) -> str:
        name = self.model.unique_name(base)
        spill, stub = self.model.spill, None
        if spill is not None and value.nbytes >= spill.min_bytes and value.dtype in ONNX_DTYPES:
            header = onnx.TensorProto(name=name, data_type=ONNX_DTYPES[value.dtype], dims=value.shape)
            stub = spill.put(header, little_endian(value))
        tensor = self.graph.initializer.add()
        if stub is not None:
            tensor.CopyFrom(stub)
        else:
            encode_tensor(value, name, tensor)
        self.initializers[name] = tensor
        if value.nbytes < MAX_MEMO_BYTES:
            self._constants[name] = (value, 0)
        return name

    def bypass(self, node: onnx.NodeProto, output: str) -> None:
        """Remove single-input, single-output `node`; its input's producer now writes `output`.

        Used when the producer's only consumer is `node`: the producer takes over `node`'s output
        name, so graph outputs and downstream consumers keep their names.
        """
        source = node.input[0]
        producer = self.producer[source]
        producer.output[producer.output[:].index(source)] = output
        for reader in self.users(source):  # metadata readers (Shape, CastLike): same dtype and shape
            if reader is not node:
                reader.input[:] = [output if name == source else name for name in reader.input]
                self.consumers[output].append(reader)
        self.producer[output] = producer
        self.producer.pop(source, None)
        self.consumers.pop(source, None)
        self.gone_names.add(source)
        self.remove_node(node, keep_outputs=True)

    def short_circuit(self, node: onnx.NodeProto, source: str | None = None) -> None:
        """Remove `node`; whoever read its (first) output reads its input `source` instead
        (default: input 0).

        Used when a BN folds into the op that reads it: the readers take BN's input directly.
        The output must not be a graph output (its name would disappear) nor read by a subgraph.
        """
        source, output = node.input[0] if source is None else source, node.output[0]
        if self.is_graph_output(output):
            raise ValueError(f"cannot short-circuit graph output '{output}'")
        for reader in self.users(output):
            reader.input[:] = [source if name == output else name for name in reader.input]
            if not any(n is reader for n in self.users(source)):
                self.consumers[source].append(reader)
        self.consumers.pop(output, None)
        self.remove_node(node)

    def add_bias_after(self, node: onnx.NodeProto, bias: np.ndarray, base: str) -> onnx.NodeProto:
        """Insert Add(node's output, bias) right after `node`, writing `node`'s output name.

        `node` now writes a fresh name, so graph outputs and every reader keep theirs.
        """
        output = node.output[0]
        name = self.model.unique_name(f"{node_label(node)}_bias")
        inner = self.model.unique_name(f"{output}_unbiased")
        bias_name = self._add_initializer(bias, base)
        node.output[0] = inner
        add = self.graph.node.add()  # appended; finish() moves it right after `node`
        add.CopyFrom(onnx.helper.make_node("Add", [inner, bias_name], [output], name=name))
        self.nodes.append(add)
        self.after.append((add, node))
        self.producer[inner] = node
        self.producer[output] = add
        self.consumers[inner].append(add)
        self.consumers[bias_name].append(add)
        return add

    def moved_sites(self, changed, site: str) -> None:
        """A fold about to change how the values `changed` are computed, compared at `site`: an
        earlier fold compared at one of them is compared at `site` instead, which carries both
        (a scale moved through a Relu into a layer that already absorbed a BN, a bias Add merged
        on)."""
        for name in changed:
            if name and site and name != site:
                self.site_aliases[name] = site

    def current_site(self, site: str) -> str:
        """Where the fold first compared at `site` is compared now (see moved_sites)."""
        seen = {site}
        while site in self.site_aliases and self.site_aliases[site] not in seen:
            site = self.site_aliases[site]
            seen.add(site)
        return site

    def copy_node(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """A copy of `node` writing fresh names, placed right after it (for a fold that must
        change a node other readers still need as it is)."""
        copy = self.graph.node.add()  # appended; finish() moves it right after `node`
        copy.CopyFrom(node)
        if node.name:
            copy.name = self.model.unique_name(f"{node.name}_bnfold")
        for i, name in enumerate(node.output):
            if name:
                copy.output[i] = self.model.unique_name(f"{name}_bnfold")
                self.producer[copy.output[i]] = copy
        for name in copy.input:
            if name:
                self.consumers[name].append(copy)
        self.nodes.append(copy)
        self.after.append((copy, node))
        return copy

    def set_input(self, node: onnx.NodeProto, position: int, name: str) -> None:
        """Point input `position` of `node` at the value `name`."""
        old = node.input[position]
        if old:
            self._drop_use(old, node)
        node.input[position] = name
        self.consumers[name].append(node)

    def remove_node(self, node: onnx.NodeProto, keep_outputs: bool = False) -> None:
        self.removed.add(id(node))
        for name in node.input:
            if name:
                self._drop_use(name, node)
        if not keep_outputs:
            for name in node.output:
                self.producer.pop(name, None)
                self.gone_names.add(name)

    def replace_node(self, node: onnx.NodeProto, op_type: str, inputs: list[str]) -> None:
        """Turn `node` into another op in place (same outputs, same position, no attributes)."""
        for name in node.input:
            if name:
                self._drop_use(name, node)
        node.op_type = op_type
        node.domain = ""
        while len(node.output) > 1 and not node.output[-1]:  # BN's unused optional outputs
            del node.output[-1]
        del node.attribute[:]
        del node.input[:]
        node.input.extend(inputs)
        for name in inputs:
            self.consumers[name].append(node)

    def set_attribute(self, node: onnx.NodeProto, name: str, value) -> None:
        for i, attr in enumerate(node.attribute):
            if attr.name == name:
                del node.attribute[i]
                break
        node.attribute.append(onnx.helper.make_attribute(name, value))

    def _drop_use(self, name: str, node: onnx.NodeProto) -> None:
        users = self.consumers.get(name)
        if users:
            self.consumers[name] = [] if users[0] is node and len(users) == 1 else [n for n in users if n is not node]
        self.orphan_candidates.add(name)

    # --- clean-up --------------------------------------------------------------------------------

    def finish(self) -> None:
        """Apply removals in one sweep and drop what the edits orphaned."""
        self._remove_orphaned_producers()
        self._place_added_nodes()
        if self.removed:
            _drop(self.graph.node, [n for n in self.nodes if id(n) in self.removed])
            self.nodes = [n for n in self.nodes if id(n) not in self.removed]
        self._drop_orphan_initializers()
        if self.gone_names:
            _drop(self.graph.value_info, [vi for vi in self.graph.value_info if vi.name in self.gone_names])

    def _place_added_nodes(self) -> None:
        """Move each added node right after the node it follows, in one stable sort."""
        if not self.after:
            return
        keys = {id(n): (i,) for i, n in enumerate(self.graph.node)}
        for seq, (added, anchor) in enumerate(self.after):  # an anchor is placed before its followers
            keys[id(added)] = keys[id(anchor)] + (seq,)
        self.graph.node.sort(key=lambda n: keys[id(n)])
        self.after.clear()

    def _remove_orphaned_producers(self) -> None:
        """Remove Identity/Constant/constant-subgraph nodes that fed only what a fold replaced."""
        pending = list(self.orphan_candidates)
        while pending:
            name = pending.pop()
            node = self.producer.get(name)
            if node is None or id(node) in self.removed or node.op_type not in CONSTANT_FOLDABLE_OPS:
                continue
            if any(self.users(o) or self.is_graph_output(o) for o in node.output if o):
                continue
            self.remove_node(node)
            pending.extend(i for i in node.input if i)

    def _drop_orphan_initializers(self) -> None:
        kept, initializers, consumers = self.outputs | self.inputs, self.initializers, self.consumers
        dead = [
            name
            for name in self.orphan_candidates
            if name in initializers and name not in kept and (not consumers.get(name) or not self.is_used(name))
            and not (self.children and self.read_by_subgraph(name))
        ]
        if dead:
            _drop(self.graph.initializer, [self.initializers.pop(name) for name in dead])

    def read_by_subgraph(self, name: str) -> bool:
        """Whether a subgraph of one of this graph's nodes reads `name` (an implicit input)."""
        return any(g.is_used(name) for g in self.children)


def _drop(field, doomed: list) -> None:
    """Remove the messages `doomed` from a repeated message field, keeping the order of the
    rest: a stable sort moves them to the end, then one cut. Rebuilding the field instead
    (clear + extend) would copy every message kept, weights included.

    Messages are matched by identity (== compares contents); `doomed` holds them, so the
    wrappers the field hands out stay the same objects. Every one of them must be in `field`.
    """
    ids = {id(item) for item in doomed}
    if ids:
        field.sort(key=lambda item: id(item) in ids)
        del field[len(field) - len(ids):]


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            kind = attr.type  # ints and floats directly: this runs for every BN's epsilon
            if kind == _INT:
                return attr.i
            if kind == _FLOAT:
                return attr.f
            return onnx.helper.get_attribute_value(attr)
    return default


_INT, _FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT


def reads_only_metadata(node: onnx.NodeProto, value: str) -> bool:
    """True when `node` uses `value` only for its dtype/shape (Shape, Size, CastLike's target)."""
    if node.op_type in ("Shape", "Size"):
        return True
    return node.op_type == "CastLike" and node.input[0] != value


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return decode_tensor(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants are not fold material


def _evaluate_bounded(node: onnx.NodeProto, values: list, opset: int) -> np.ndarray | None:
    """Evaluate one pure node on constant inputs, unless its output would be larger than its
    inputs by more than MAX_CONSTANT_GROWTH elements (predicted from the inputs, before any
    allocation) or its size cannot be predicted."""
    if node.op_type == "Identity":
        return values[0]
    size = _output_size(node, values)
    held = sum(v.size for v in {id(v): v for v in values if v is not None}.values())
    if size is None or size > max(MAX_CONSTANT_GROWTH, held):
        return None
    return _evaluate(node, values, opset)


# Ops whose output has as many elements as input 0 (Slice: at most as many).
_SIZE_OF_INPUT_OPS = frozenset(
    {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Neg", "Sqrt", "Reciprocal", "Flatten", "Slice"}
)


def _output_size(node: onnx.NodeProto, values: list) -> int | None:
    """Elements `node` would produce from `values`, None if unknown (or the inputs are invalid)."""
    op = node.op_type
    try:
        if op in _SIZE_OF_INPUT_OPS:
            return values[0].size
        if op in ("Add", "Sub", "Mul", "Div"):
            return _count(np.broadcast_shapes(*(v.shape for v in values)))
        if op == "Concat":
            return sum(v.size for v in values)
        if op == "Gather":
            data, indices = values
            return data.size // data.shape[attribute(node, "axis", 0)] * indices.size if data.size else 0
        if op == "Expand":
            return _count(np.broadcast_shapes(values[0].shape, _shape_value(values[1])))
        if op == "ConstantOfShape":
            return _count(_shape_value(values[0])) if values else 1
        if op == "Range":
            start, limit, delta = (float(v.reshape(-1)[0]) for v in values)
            return max(int(np.ceil((limit - start) / delta)), 0)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError):
        return None
    return None


def _shape_value(value: np.ndarray) -> tuple[int, ...]:
    if value.ndim != 1 or value.dtype.kind not in "iu" or np.any(value < 0):
        raise ValueError("not a shape")
    return tuple(int(d) for d in value)


def _count(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _evaluate(node: onnx.NodeProto, values: list, opset: int) -> np.ndarray | None:
    """Evaluate one pure node on constant inputs with onnx's reference evaluator (Expand, the
    zero bias of every bias-less Conv in a dynamo export, directly in numpy)."""
    if node.op_type == "Expand" and len(values) == 2:
        data, shape = values
        try:
            return np.array(np.broadcast_to(data, np.broadcast_shapes(data.shape, _shape_value(shape))))
        except ValueError:
            return None
    from onnx.reference import ReferenceEvaluator

    feeds = {name: v for name, v in zip(node.input, values) if name}
    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset} if opset else None)
        result = evaluator.run([node.output[0]], feeds)[0]
    except Exception:  # a constant we cannot evaluate is simply not a constant for us
        return None
    return np.asarray(result)
