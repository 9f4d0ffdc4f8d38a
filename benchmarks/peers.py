"""The tools bnfold is compared with, each as one whole process: `python peers.py TOOL SRC DST`.

compare.py starts one fresh process per run, so the interpreter start and the imports are part
of every tool's time and memory, as they are for the `bnfold` command itself. A source whose
weights live in external data is written with external data (DST.data beside DST) by every
tool that can; the others fail as they would for a user, and compare.py reports the error.

    onnx          onnx.load (external data included) + onnx.save: the anchor
    ort-basic     onnxruntime offline optimisation, ORT_ENABLE_BASIC (includes its Conv+BN fusion)
    onnxoptimizer onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    onnxscript-bn onnxscript's rewriter with only its BatchNormalization fusion rules
    onnxscript-opt onnxscript.optimizer.optimize: constant folding + the default rewrite rules
                  (BN fusion among them)

`cp` and `bnfold` need no Python wrapper: compare.py runs them as the user would; onnxslim is
run through its own command line (`onnxslim SRC DST`).
"""

from __future__ import annotations

import pathlib
import sys


def has_external_data(path: pathlib.Path) -> bool:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def run_onnx(src: pathlib.Path, dst: pathlib.Path) -> None:
    import onnx

    external = has_external_data(src)
    model = onnx.load(src)
    onnx.save(model, dst, save_as_external_data=external, location=f"{dst.name}.data")


def run_ort_basic(src: pathlib.Path, dst: pathlib.Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    if has_external_data(src):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{dst.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def run_onnxoptimizer(src: pathlib.Path, dst: pathlib.Path) -> None:
    import onnx
    import onnxoptimizer

    external = has_external_data(src)
    model = onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"])
    onnx.save(model, dst, save_as_external_data=external, location=f"{dst.name}.data")


def _ir_save(model, src: pathlib.Path, dst: pathlib.Path) -> None:
    from onnxscript import ir

    if has_external_data(src):
        ir.save(model, dst, external_data=f"{dst.name}.data")
    else:
        ir.save(model, dst)


def run_onnxscript_bn(src: pathlib.Path, dst: pathlib.Path) -> None:
    from onnxscript import ir, rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    model = ir.load(src)
    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    rewriter.rewrite(model, pattern_rewrite_rules=rules)
    _ir_save(model, src, dst)


def run_onnxscript_opt(src: pathlib.Path, dst: pathlib.Path) -> None:
    import onnxscript.optimizer
    from onnxscript import ir

    model = ir.load(src)
    onnxscript.optimizer.optimize(model)
    _ir_save(model, src, dst)


TOOLS = {
    "onnx": run_onnx,
    "ort-basic": run_ort_basic,
    "onnxoptimizer": run_onnxoptimizer,
    "onnxscript-bn": run_onnxscript_bn,
    "onnxscript-opt": run_onnxscript_opt,
}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in TOOLS:
        print(f"usage: peers.py {{{','.join(TOOLS)}}} SRC DST", file=sys.stderr)
        return 2
    TOOLS[argv[0]](pathlib.Path(argv[1]), pathlib.Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
