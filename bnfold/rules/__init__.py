"""The fold rules, in the order they are tried. Adding a pattern = one module + one test file."""

from bnfold.rules.conv import BnIntoConv
from bnfold.rules.conv_transpose import BnIntoConvTranspose
from bnfold.rules.gemm import BnIntoGemm
from bnfold.rules.matmul import BnIntoMatMul, BnIntoMatMulAdd

RULES = (BnIntoConv(), BnIntoConvTranspose(), BnIntoGemm(), BnIntoMatMul(), BnIntoMatMulAdd())
RULE_NAMES = tuple(rule.name for rule in RULES)

__all__ = ["RULES", "RULE_NAMES"]
