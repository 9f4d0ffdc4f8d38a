"""Initializers that are also graph inputs: constants in IR < 4, overridable defaults after.

IR < 4 (Caffe2 and other old exporters; the onnx package's model-zoo test graphs) required every
initializer to be listed in graph.input as well: such an input is a constant. From IR 4 on, an
initializer listed as an input is a default a caller may feed another value for, so a fold that
relied on its value would be wrong for that caller: the BN reading it is kept, unless the user
freezes these inputs (`freeze=True`, `--freeze-initializer-inputs`).

Both are done the same way: before the fold the initializer-backed inputs leave the main graph's
input list (`take_out`), so every rule sees plain initializers; after it they are listed again
(`put_back`), the data inputs untouched and in their place:
- IR < 4: every initializer of the output is listed, as that IR requires: the input's entries
  in their order (typed from the tensor where a fold changed its type), then new initializers';
  initializers the fold removed leave the list.
- frozen (IR >= 4): an input whose initializer the fold left as it was is listed again as it
  was; one whose initializer the fold changed or removed is not (feeding it would no longer mean
  what it did), and the report names it.
"""

from __future__ import annotations

import dataclasses
import hashlib

import onnx

IR_LISTS_INITIALIZERS = 4  # below this IR version every initializer is also a graph input


@dataclasses.dataclass
class Listing:
    """The main graph's input list as it was, and what `put_back` needs to restore it."""

    ir_below_4: bool
    entries: list[onnx.ValueInfoProto]  # the original input list (copies), in order
    backed: set[str]  # the names among them that an initializer backs
    digests: dict[str, bytes]  # frozen mode: name -> digest of its initializer before the fold

    @property
    def reason(self) -> str:
        return f"IR {IR_LISTS_INITIALIZERS - 1} model" if self.ir_below_4 else "--freeze-initializer-inputs"


def take_out(model: onnx.ModelProto, freeze: bool = False) -> Listing | None:
    """Remove the initializer-backed inputs from the input list when they are constants (IR < 4)
    or frozen; None (nothing done) otherwise, or when there are none."""
    graph = model.graph
    ir_below_4 = 0 < model.ir_version < IR_LISTS_INITIALIZERS
    if not (ir_below_4 or freeze):
        return None  # before indexing the initializers: most models end here
    initializers = {t.name: t for t in graph.initializer}
    backed = {i.name for i in graph.input if i.name in initializers}
    if not backed:
        return None
    digests = {} if ir_below_4 else {name: _digest(initializers[name]) for name in backed}
    entries = [_copy(i) for i in graph.input]
    data = [i for i in entries if i.name not in backed]
    del graph.input[:]
    graph.input.extend(data)
    return Listing(ir_below_4, entries, backed, digests)


def put_back(model: onnx.ModelProto, listing: Listing | None) -> tuple[str, ...]:
    """List the initializers again as `listing` says; returns the frozen inputs no longer listed."""
    if listing is None:
        return ()
    initializers = {t.name: t for t in model.graph.initializer}
    listed, unlisted = [], []
    for entry in listing.entries:
        tensor = initializers.get(entry.name)
        if entry.name not in listing.backed:
            listed.append(entry)
        elif tensor is None or (not listing.ir_below_4 and _digest(tensor) != listing.digests[entry.name]):
            unlisted.append(entry.name)
        else:
            listed.append(entry if _same_type(entry, tensor) else _typed_like(tensor))
    if listing.ir_below_4:
        names = {entry.name for entry in listed}
        listed += [_typed_like(t) for t in model.graph.initializer if t.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(listed)
    return () if listing.ir_below_4 else tuple(unlisted)


def _digest(tensor: onnx.TensorProto) -> bytes:
    return hashlib.blake2b(tensor.SerializeToString(), digest_size=16).digest()


def _copy(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    return copy


def _same_type(entry: onnx.ValueInfoProto, tensor: onnx.TensorProto) -> bool:
    """Whether the entry still describes the tensor (a symbolic or missing dim describes any)."""
    tensor_type = entry.type.tensor_type
    if tensor_type.elem_type != tensor.data_type:
        return False
    if not tensor_type.HasField("shape"):
        return True
    dims = tensor_type.shape.dim
    return len(dims) == len(tensor.dims) and all(not d.HasField("dim_value") or d.dim_value == n for d, n in zip(dims, tensor.dims))


def _typed_like(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
