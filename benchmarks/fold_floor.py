"""How fast a Conv -> BN chain could fold at Python speed, with every check left out.

Folds each BN of a Conv -> BN -> Relu chain (make_models.py's chain2k / chain20k) into its Conv
doing only what any fold must: decode BN's four vectors and the Conv weight, the float64
arithmetic, encode the two new tensors, rewire the Conv. No check, no index upkeep, no clean-up:
the output is NOT a valid fold of an arbitrary model. It is a yardstick: what bnfold spends
beyond it is the checks and bookkeeping that make its folds safe.

    python benchmarks/fold_floor.py /tmp/bnfold-bench/models/chain20k.onnx
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bnfold import io
from bnfold.graph import decode_tensor, encode_tensor


def fold_unchecked(graph) -> int:
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "BatchNormalization":
            continue
        gamma, beta, mean, var = np.array([decode_tensor(initializers[n]) for n in node.input[1:5]], dtype=np.float64)
        conv = producer[node.input[0]]
        weight = decode_tensor(initializers[conv.input[1]])
        scale = gamma / np.sqrt(var + 1e-5)
        new_weight = (weight * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        new_bias = (beta - mean * scale).astype(weight.dtype)
        encode_tensor(new_weight, conv.input[1] + "_folded", graph.initializer.add())
        encode_tensor(new_bias, conv.output[0] + "_bias", graph.initializer.add())
        conv.input[1] = conv.input[1] + "_folded"
        conv.output[0] = node.output[0]
        folded += 1
    return folded


def main(path: str) -> int:
    model = io.load_model(path).model
    start = time.perf_counter()
    folded = fold_unchecked(model.graph)
    print(f"{folded} BN, unchecked fold loop: {time.perf_counter() - start:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
