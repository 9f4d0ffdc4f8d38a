"""The fold rules, in the order they are tried. Adding a pattern = one module + one test file.

Forward rules (BN into the op producing its input) come first: a BN is folded backward (into the
op reading its output) only when no forward rule can fold it. AFFINE_RULES fold BN written out
as arithmetic (constant Mul / Add / Sub / Div chains) with the BN rules' own arithmetic.
"""

from bnfold.rules.conv import BnIntoConv
from bnfold.rules.conv_transpose import BnIntoConvTranspose
from bnfold.rules.decomposed import AFFINE_RULES
from bnfold.rules.gemm import BnIntoGemm
from bnfold.rules.matmul import BnIntoMatMul, BnIntoMatMulAdd
from bnfold.rules.next_conv import BnIntoNextConv
from bnfold.rules.next_gemm import BnIntoNextGemm
from bnfold.rules.next_matmul import BnIntoNextMatMul
from bnfold.rules.next_through_shape import BnThroughShapeIntoNextGemm, BnThroughShapeIntoNextMatMul
from bnfold.rules.through_flatten import BnThroughFlattenIntoGemm, BnThroughFlattenIntoMatMul
from bnfold.rules.through_relu import BnScaleThroughRelu
from bnfold.rules.through_shape import (
    BnThroughShapeIntoConv,
    BnThroughShapeIntoConvTranspose,
    BnThroughShapeIntoGemm,
    BnThroughShapeIntoMatMul,
    BnThroughShapeIntoMatMulAdd,
)

BACKWARD_RULES = (
    BnIntoNextConv(),
    BnIntoNextGemm(),
    BnIntoNextMatMul(),
    BnThroughFlattenIntoGemm(),
    BnThroughFlattenIntoMatMul(),
    BnThroughShapeIntoNextGemm(),  # after the Flatten rules: they own a single Flatten/Reshape
    BnThroughShapeIntoNextMatMul(),
)
FORWARD_RULES = (
    BnIntoConv(),
    BnIntoConvTranspose(),
    BnIntoGemm(),
    BnIntoMatMul(),
    BnIntoMatMulAdd(),
    BnThroughShapeIntoConv(),
    BnThroughShapeIntoConvTranspose(),
    BnThroughShapeIntoGemm(),
    BnThroughShapeIntoMatMul(),
    BnThroughShapeIntoMatMulAdd(),
    BnScaleThroughRelu(defer_to=BACKWARD_RULES),  # a backward rule that folds the BN entirely is better
)
RULES = FORWARD_RULES + BACKWARD_RULES
ALL_RULES = RULES + AFFINE_RULES
RULE_NAMES = tuple(rule.name for rule in ALL_RULES)

__all__ = ["RULES", "RULE_NAMES", "ALL_RULES", "AFFINE_RULES", "FORWARD_RULES", "BACKWARD_RULES"]
