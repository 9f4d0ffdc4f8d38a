"""The ONNX side must not need torch (the `torch` extra is optional): checked in a fresh
interpreter in which importing torch or onnxscript fails, as on a machine without them."""

import subprocess
import sys
import pathlib

MODELS = pathlib.Path(__file__).resolve().parent.parent / "models"

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['onnxscript'] = None; "


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_packaging_fold_and_verify_without_torch(tmp_path):
    code = (
        "import bnfold; "
        f"r = bnfold.fold_file({str(MODELS / 'resnet_mini.onnx')!r}, {str(tmp_path / 'out.onnx')!r}); "
        "assert r.report.bn_after == 0 and r.verification.passed; "
        "assert sys.modules['torch'] is None, 'torch was imported'"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr


def test_packaging_cli_without_torch(tmp_path):
    done = run_python("from bnfold.cli import main; main(['check', %r])" % str(MODELS / "mlp_bn.onnx"))
    assert done.returncode == 1, done.stderr  # foldable BN found: check exits 1
    assert "2 foldable" in done.stderr and "Traceback" not in done.stderr


def test_packaging_torch_side_without_torch_says_which_extra():
    done = run_python("import bnfold.torch")
    assert done.returncode == 1
    assert "pip install 'bnfold[torch]'" in done.stderr
