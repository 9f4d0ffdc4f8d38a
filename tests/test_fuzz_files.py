"""Mutation fuzzing of valid model files through the CLI and the API.

Each case takes one of a few small valid seed models, damages it once (byte flips, truncation,
inserted or overwritten bytes, or a protobuf-level edit: a field, node or initializer deleted, a
dtype swapped, an integer or a name changed, an element duplicated) and runs it through
`bnfold fold --json` (click's CliRunner), `bnfold.fold(path)` and `bnfold.fold_file(path)`.

The promise checked for every case: no traceback, no "internal error", bounded time; `bnfold
fold` exits 0 with a loadable, verified output (a fold that fails verification is rolled back),
or 2 with a one-line message and nothing written (check and verify: 1 is their answer);
the API returns a result or raises a BnfoldError, never anything else; the input file is never
modified and no temporary folder is left behind.

Seeded and deterministic: case i always gets the same seed model and mutation. The quick
profile runs QUICK_CASES cases; `BNFOLD_FUZZ_CASES=3000 pytest tests/test_fuzz_files.py -s`
runs a long profile and prints the outcome counts.
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import json
import os
import pathlib
import shutil
import time

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

import bnfold
from bnfold import io
from bnfold.cli import main
from conftest import bn_node, make_model, tensor, value_info

QUICK_CASES = 200
SEED = 20261124
CASE_SECONDS = 10.0  # a case slower than this counts as a hang
HANG_GUARD_SECONDS = 120  # a case stuck in C code past this dumps every stack and ends the run


# --------------------------------------------------------------------------- seed models


def _seed_conv(rng) -> onnx.ModelProto:
    """Conv(+bias) -> BN (foldable) -> Relu -> BN (kept), symbolic batch."""
    inits = [
        tensor("W", rng.normal(0, 0.5, [4, 3, 3, 3]).astype(np.float32)),
        tensor("Wb", rng.normal(0, 0.5, [4]).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W", "Wb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node(inits, "c", "b1", rng, 4, name="bn1"),
        helper.make_node("Relu", ["b1"], ["r"], name="relu"),
        bn_node(inits, "r", "y", rng, 4, name="bn2", epsilon=1e-3),
    ]
    return make_model(nodes, [value_info("x", np.float32, ["batch", 3, 5, 5])], [value_info("y", np.float32, ["batch", 4, 5, 5])], inits)


def _seed_gemm(rng) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [6, 5]).astype(np.float32)), tensor("C", rng.normal(0, 0.5, [6]).astype(np.float32))]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "C"], ["g"], name="gemm", transB=1),
        bn_node(inits, "g", "y", rng, 6, name="bn"),
    ]
    return make_model(nodes, [value_info("x", np.float32, [2, 5])], [value_info("y", np.float32, [2, 6])], inits)


def _seed_matmul_fp16(rng) -> onnx.ModelProto:
    inits = [tensor("W", rng.normal(0, 0.5, [5, 3]).astype(np.float16))]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
        bn_node(inits, "m", "y", rng, 3, dtype=np.float16, name="bn"),
    ]
    return make_model(nodes, [value_info("x", np.float16, [2, 5])], [value_info("y", np.float16, [2, 3])], inits)


def _seed_conv_transpose_constants(rng) -> onnx.ModelProto:
    """ConvTranspose with groups; BN scale from a Constant node, mean through Identity."""
    inits = [tensor("W", rng.normal(0, 0.5, [4, 3, 2, 2]).astype(np.float32))]
    scale = rng.uniform(0.5, 2, 6).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["scale"], name="const", value=tensor("scale_v", scale)),
        helper.make_node("ConvTranspose", ["x", "W"], ["t"], name="convt", group=2),
        bn_node(inits, "t", "y", rng, 6, name="bn"),
    ]
    nodes[2].input[1] = "scale"
    nodes.insert(2, helper.make_node("Identity", ["bn_mean"], ["mean_id"], name="id"))
    nodes[3].input[3] = "mean_id"
    return make_model(nodes, [value_info("x", np.float32, [1, 4, 3, 3])], [value_info("y", np.float32, [1, 6, 4, 4])], inits)


def _seed_if(rng) -> onnx.ModelProto:
    """A BN inside an If branch, reading an outer value."""
    inits: list = []
    w = tensor("W", rng.normal(0, 0.5, [3, 3, 1, 1]).astype(np.float32))
    then_nodes = [
        helper.make_node("Conv", ["x", "W"], ["tc"], name="tconv"),
        bn_node(inits, "tc", "to", rng, 3, name="tbn"),
    ]
    then_branch = helper.make_graph(then_nodes, "then", [], [value_info("to", np.float32, [1, 3, 2, 2])], [w, *inits])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["eo"], name="eid")], "else", [], [value_info("eo", np.float32, [1, 3, 2, 2])]
    )
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch, else_branch=else_branch)
    inputs = [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), value_info("x", np.float32, [1, 3, 2, 2])]
    return make_model([node], inputs, [value_info("y", np.float32, [1, 3, 2, 2])])


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    model: onnx.ModelProto
    external: bool = False  # saved with its weights in "m.data"


def seed_models() -> list[Seed]:
    rng = np.random.default_rng(SEED)
    conv = _seed_conv(rng)
    return [
        Seed("conv", conv),
        Seed("conv_external", conv, external=True),
        Seed("gemm", _seed_gemm(rng)),
        Seed("matmul_fp16", _seed_matmul_fp16(rng)),
        Seed("conv_transpose_constants", _seed_conv_transpose_constants(rng)),
        Seed("if", _seed_if(rng)),
    ]


def write_seed(seed: Seed, folder: pathlib.Path) -> pathlib.Path:
    """The seed model as files in `folder`: m.onnx, plus m.data for the external one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(seed.model)
    if seed.external:
        onnx.save(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    else:
        onnx.save(copy, path)
    return path


# --------------------------------------------------------------------------- mutations


def _flip_bits(data: bytes, rng) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        out[int(rng.integers(len(out)))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _truncate(data: bytes, rng) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def _insert_bytes(data: bytes, rng) -> bytes:
    at = int(rng.integers(len(data)))
    return data[:at] + rng.bytes(int(rng.integers(1, 17))) + data[at:]


def _overwrite_chunk(data: bytes, rng) -> bytes:
    at = int(rng.integers(len(data)))
    chunk = rng.bytes(int(rng.integers(1, 33)))
    return (data[:at] + chunk + data[at + len(chunk):])[: len(data)]


BYTE_MUTATIONS = [_flip_bits, _truncate, _insert_bytes, _overwrite_chunk]


def _repeated(field) -> bool:
    """protobuf 6+ has is_repeated; older ones only the label."""
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def _messages(message, depth=0):
    """Every submessage of `message` (itself included), depth-first."""
    yield message
    if depth > 12:
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if _repeated(field):
            for item in value:
                yield from _messages(item, depth + 1)
        else:
            yield from _messages(value, depth + 1)


def _pick(rng, items):
    items = list(items)
    return items[int(rng.integers(len(items)))] if items else None


def _graphs(model: onnx.ModelProto):
    return [m for m in _messages(model) if isinstance(m, onnx.GraphProto)]


def _delete_field(model, rng) -> str:
    """Clear one set field (or delete one element of a repeated field) anywhere in the model."""
    message = _pick(rng, _messages(model))
    field, value = _pick(rng, message.ListFields())
    if _repeated(field):
        i = int(rng.integers(len(value)))
        del value[i]
        return f"delete {type(message).__name__}.{field.name}[{i}]"
    message.ClearField(field.name)
    return f"clear {type(message).__name__}.{field.name}"


def _delete_node(model, rng) -> str:
    graph = _pick(rng, [g for g in _graphs(model) if len(g.node)])
    i = int(rng.integers(len(graph.node)))
    op = graph.node[i].op_type
    del graph.node[i]
    return f"delete node {op} of {graph.name}"


def _delete_initializer(model, rng) -> str:
    graph = _pick(rng, [g for g in _graphs(model) if len(g.initializer)])
    if graph is None:
        return _delete_node(model, rng)
    i = int(rng.integers(len(graph.initializer)))
    name = graph.initializer[i].name
    del graph.initializer[i]
    return f"delete initializer {name}"


DTYPES = [v for v in TensorProto.DataType.values() if v] + [99]


def _swap_dtype(model, rng) -> str:
    tensors = [m for m in _messages(model) if isinstance(m, onnx.TensorProto)]
    types = [m for m in _messages(model) if isinstance(m, onnx.TypeProto.Tensor)]
    new = int(_pick(rng, DTYPES))
    target = _pick(rng, tensors + types)
    if isinstance(target, onnx.TensorProto):
        target.data_type = new
        return f"tensor {target.name} dtype -> {new}"
    target.elem_type = new
    return f"value elem_type -> {new}"


INTERESTING_INTS = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, -(2**31), 2**40, 2**62]


def _change_int(model, rng) -> str:
    """Replace one integer (a dim, an attribute, a version, ...) with a boundary value."""
    spots = []
    for message in _messages(model):
        for field, value in message.ListFields():
            if field.type in (field.TYPE_INT64, field.TYPE_INT32, field.TYPE_ENUM, field.TYPE_UINT64):
                spots.append((message, field, value))
    message, field, value = _pick(rng, spots)
    new = int(_pick(rng, INTERESTING_INTS))
    if field.type == field.TYPE_UINT64 and new < 0:
        new = 2**64 - 1
    if field.type in (field.TYPE_INT32, field.TYPE_ENUM):
        new = int(np.clip(new, -(2**31), 2**31 - 1))
    try:
        if _repeated(field):
            value[int(rng.integers(len(value)))] = new
        else:
            setattr(message, field.name, new)
    except (ValueError, TypeError):  # an enum protobuf refuses: the mutation is a no-op
        return f"no-op {field.name}"
    return f"{type(message).__name__}.{field.name} -> {new}"


def _rename(model, rng) -> str:
    """Point one name (a node input/output, an initializer, a graph I/O) at another name."""
    names = sorted({n for m in _messages(model) if isinstance(m, onnx.NodeProto) for n in (*m.input, *m.output) if n})
    message = _pick(rng, [m for m in _messages(model) if isinstance(m, (onnx.NodeProto, onnx.TensorProto, onnx.ValueInfoProto))])
    new = _pick(rng, names + ["", "dangling"])
    if isinstance(message, onnx.NodeProto):
        field = message.input if (rng.integers(2) and len(message.input)) or not len(message.output) else message.output
        field[int(rng.integers(len(field)))] = new
        return f"node {message.op_type} name -> {new!r}"
    message.name = new
    return f"{type(message).__name__} name -> {new!r}"


def _duplicate(model, rng) -> str:
    graph = _pick(rng, _graphs(model))
    items = _pick(rng, [f for f in (graph.node, graph.initializer, graph.input, graph.output) if len(f)])
    items.add().CopyFrom(items[int(rng.integers(len(items)))])
    return f"duplicate an element of {graph.name}"


SPECIAL_VALUES = [np.nan, np.inf, -np.inf, 0.0, -1.0, -1e-5, 1e30, -1e30, 6e4, 1e-45]


def _poke_value(model, rng) -> str:
    """Set one element of a float tensor to NaN, Inf, zero, a negative or a huge value."""
    floats = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}
    tensors = [m for m in _messages(model) if isinstance(m, onnx.TensorProto) and m.data_type in floats and m.raw_data]
    tensor = _pick(rng, tensors)
    if tensor is None:
        return _change_int(model, rng)
    values = np.frombuffer(tensor.raw_data, dtype=floats[tensor.data_type]).copy()
    value = _pick(rng, SPECIAL_VALUES)
    with np.errstate(over="ignore"):
        values[int(rng.integers(values.size))] = value
    tensor.raw_data = values.tobytes()
    return f"tensor {tensor.name} element -> {value}"


def _insert_noop(model, rng) -> str:
    """An exporter habit: an Identity or Dropout right after a node, its readers moved behind it
    (bnfold removes such nodes before folding)."""
    graph = _pick(rng, _graphs(model))
    producers = [(i, n) for i, n in enumerate(graph.node) if n.output and n.output[0]]
    picked = _pick(rng, producers)
    if picked is None:
        return _duplicate(model, rng)
    index, producer = picked
    value, op = producer.output[0], _pick(rng, ["Identity", "Identity", "Dropout"])
    moved = f"{value}_after_{op.lower()}"
    for node in graph.node:
        node.input[:] = [moved if name == value else name for name in node.input]
    graph.node.insert(index + 1, onnx.helper.make_node(op, [value], [moved], name=f"{op.lower()}_{value}"))
    return f"{op} inserted after {value}"


PROTO_MUTATIONS = [
    _delete_field, _delete_node, _delete_initializer, _swap_dtype, _change_int, _rename, _duplicate, _poke_value,
    _insert_noop, _insert_noop,
]


@dataclasses.dataclass(frozen=True)
class Case:
    index: int
    seed: Seed
    mutation: str
    files: dict  # name -> bytes


def make_case(index: int, seeds: list[Seed], base: dict[str, dict]) -> Case:
    """Case `index`: a seed and one mutation, both drawn from an rng seeded by the index."""
    rng = np.random.default_rng([SEED, index])
    seed = seeds[index % len(seeds)]
    files = dict(base[seed.name])
    if rng.random() < 0.5:
        mutate = _pick(rng, BYTE_MUTATIONS)
        target = "m.data" if seed.external and rng.random() < 0.3 else "m.onnx"
        files[target] = mutate(files[target], rng)
        return Case(index, seed, f"{mutate.__name__} {target}", files)
    model = onnx.ModelProto()
    model.ParseFromString(files["m.onnx"])
    mutate = _pick(rng, PROTO_MUTATIONS)
    what = mutate(model, rng)
    files["m.onnx"] = model.SerializeToString()
    return Case(index, seed, f"{mutate.__name__}: {what}", files)


def seed_files(seeds: list[Seed], folder: pathlib.Path) -> dict[str, dict]:
    out = {}
    for seed in seeds:
        path = write_seed(seed, folder / seed.name)
        out[seed.name] = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    return out


# --------------------------------------------------------------------------- running one case


@dataclasses.dataclass
class Outcome:
    cli_exits: dict  # command -> exit code
    api: str  # "ok", "ok_verified" or the BnfoldError class name
    seconds: float
    failures: list[str]


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".bnfold"))


def _invoke(args: list[str], failures: list[str], what: str):
    """Run the CLI; record a failure for a traceback, an internal error or an odd exit."""
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    lines = result.stderr.strip().splitlines()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        failures.append(f"{what} raised {type(result.exception).__name__}: {result.exception}")
    if "Traceback" in result.stderr or "internal error" in result.stderr:
        failures.append(f"{what}: {lines[-1] if lines else result.stderr!r}")
    if result.exit_code not in (0, 1, 2):
        failures.append(f"{what} exit code {result.exit_code}: {result.stderr!r}")
    if result.exit_code == 2 and (len(lines) != 1 or not lines[0].startswith("bnfold: error:")):
        failures.append(f"{what} exit 2 with stderr {result.stderr!r}")
    return result, lines


def _check_cli(case: Case, folder: pathlib.Path, reference: pathlib.Path, failures: list[str]) -> dict[str, int]:
    """`bnfold fold`, `bnfold check` and `bnfold verify ORIGINAL MUTATED`; their exit codes."""
    src, out = folder / "m.onnx", folder / "out.onnx"
    result, lines = _invoke(["fold", str(src), "-o", str(out), "--json"], failures, "fold")
    if result.exit_code == 0:
        report = json.loads(result.stdout)
        verification = report["verification"]
        if report["folded"] and not (verification and verification["passed"]):
            failures.append("fold exit 0 without a passed verification")
        try:
            io.load_model(out)
        except bnfold.BnfoldError as err:
            failures.append(f"fold exit 0 but the output does not load: {err}")
    elif out.exists():
        failures.append(f"fold exit {result.exit_code} but {out.name} was written")
    elif result.exit_code == 1:  # a fold that fails verification is rolled back: never exit 1
        failures.append(f"fold exit 1 with stderr {result.stderr!r}")
    codes = {"fold": result.exit_code}
    codes["check"] = _invoke(["check", str(src), "--json"], failures, "check")[0].exit_code
    codes["verify"] = _invoke(["verify", str(reference), str(src)], failures, "verify")[0].exit_code
    return codes


def _check_api(folder: pathlib.Path, failures: list[str]) -> str:
    src, out = folder / "m.onnx", folder / "api.onnx"
    try:
        bnfold.fold(src)
        result = bnfold.fold_file(src, out)
    except bnfold.VerificationFailed as err:
        failures.append(f"api raised VerificationFailed (rollback should have prevented it): {err}")
        return type(err).__name__
    except bnfold.BnfoldError as err:
        if out.exists():
            failures.append(f"api raised {type(err).__name__} but {out.name} was written")
        if "\n" in str(err):
            failures.append(f"api message is not one line: {err!r}")
        return type(err).__name__
    except Exception as err:  # noqa: BLE001 - exactly what the fuzzer looks for
        failures.append(f"api raised {type(err).__name__}: {str(err)[:300]}")
        return type(err).__name__
    if result.modified and not (result.verification and result.verification.passed):
        failures.append("fold_file returned a modified model without a passed verification")
    return "ok_verified" if result.verification is not None else "ok"


def run_case(case: Case, folder: pathlib.Path, reference: pathlib.Path) -> Outcome:
    folder.mkdir(parents=True)
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    failures: list[str] = []
    started = time.perf_counter()
    codes = _check_cli(case, folder, reference, failures)
    api = _check_api(folder, failures)
    seconds = time.perf_counter() - started
    if seconds > CASE_SECONDS:
        failures.append(f"took {seconds:.1f} s")
    changed = [name for name, data in case.files.items() if (folder / name).read_bytes() != data]
    if changed:
        failures.append(f"input files changed: {changed}")
    if _leftovers(folder):
        failures.append(f"temporary folders left: {_leftovers(folder)}")
    return Outcome(codes, api, seconds, failures)


def fuzz(count: int, folder: pathlib.Path, start: int = 0) -> tuple[collections.Counter, list[str], float]:
    """Run cases start..start+count; (outcome counts, failure lines, slowest case in seconds)."""
    seeds = seed_models()
    base = seed_files(seeds, folder / "seeds")
    counts: collections.Counter = collections.Counter()
    failures = []
    slowest = 0.0
    faulthandler.dump_traceback_later(HANG_GUARD_SECONDS, repeat=True, exit=True)
    try:
        for index in range(start, start + count):
            case = make_case(index, seeds, base)
            outcome = run_case(case, folder / f"case{index}", folder / "seeds" / case.seed.name / "m.onnx")
            for command, code in outcome.cli_exits.items():
                counts[f"{command} exit {code}"] += 1
            counts[f"api {outcome.api}"] += 1
            counts["failed"] += bool(outcome.failures)
            slowest = max(slowest, outcome.seconds)
            for failure in outcome.failures:
                failures.append(f"case {index} ({case.seed.name}, {case.mutation}): {failure}")
            shutil.rmtree(folder / f"case{index}", ignore_errors=True)
            faulthandler.dump_traceback_later(HANG_GUARD_SECONDS, repeat=True, exit=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return counts, failures, slowest


# --------------------------------------------------------------------------- the tests


def test_fuzz_seeds_are_valid_and_fold(tmp_path):
    """Unmutated, every seed folds and verifies (otherwise the fuzz proves little)."""
    for seed in seed_models():
        path = write_seed(seed, tmp_path / seed.name)
        result = bnfold.fold_file(path, path.with_name("out.onnx"))
        assert result.modified and result.verification.passed, seed.name


def test_fuzz_cases_are_deterministic(tmp_path):
    seeds = seed_models()
    base = seed_files(seeds, tmp_path)
    for index in (0, 1, 7, 42):
        a, b = make_case(index, seeds, base), make_case(index, seeds, base)
        assert a.files == b.files and a.mutation == b.mutation


def test_fuzz_quick_profile(tmp_path):
    count = int(os.environ.get("BNFOLD_FUZZ_CASES", QUICK_CASES))
    started = time.perf_counter()
    counts, failures, slowest = fuzz(count, tmp_path)
    elapsed = time.perf_counter() - started
    print(f"\nfuzz: {count} cases in {elapsed:.1f} s (slowest {slowest:.2f} s): {dict(sorted(counts.items()))}")
    for line in failures:
        print(line)
    assert not failures, "\n".join(failures[:20])
    for command in ("fold", "check", "verify"):
        assert sum(counts[f"{command} exit {code}"] for code in (0, 1, 2)) == count
