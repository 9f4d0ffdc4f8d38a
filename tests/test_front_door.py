"""What a new user meets first: README's examples run as written, the flags it documents exist,
re-running over a folder does not fold bnfold's own outputs again, `check --json` is a dry run,
a kept BN points at --standalone affine, and `python -m bnfold` is `bnfold`."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from test_cli import invoke

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks():
    for document in DOCUMENTS:
        for number, block in enumerate(PYTHON_BLOCK.findall(document.read_text()), 1):
            yield pytest.param(block, id=f"{document.name}-{number}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_front_door_python_examples_run_as_written(code, tmp_path):
    """Each ```python block of README.md and docs/, run from a copy of the repository root
    (models/ included), in a fresh interpreter."""
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("*.folded.onnx", "out"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"example failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"


def help_texts() -> str:
    texts = []
    for command in ([], ["fold"], ["check"], ["verify"]):
        texts.append(CliRunner().invoke(main, [*command, "--help"]).output)
    return "\n".join(texts)


def test_front_door_documented_flags_exist():
    """Every --flag README.md names is one `bnfold` (or a subcommand) takes."""
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", (ROOT / "README.md").read_text()))
    known = set(re.findall(r"--[a-z][a-z0-9-]+", help_texts()))
    assert documented, "README names no flag at all"
    assert documented <= known, f"README names flags bnfold does not take: {sorted(documented - known)}"


def test_front_door_documented_exit_codes_match_help():
    readme, helped = (ROOT / "README.md").read_text(), help_texts()
    for code in ("0", "1", "2", "130"):
        assert re.search(rf"\b{code}\b", helped)
        assert re.search(rf"\*\*{code}\*\*|`{code}`|\b{code}\b", readme), f"README does not document exit code {code}"


@pytest.fixture
def folder(tmp_path):
    shutil.copy(ROOT / "models" / "resnet_mini.onnx", tmp_path / "a.onnx")
    shutil.copy(ROOT / "models" / "mlp_bn.onnx", tmp_path / "b.onnx")
    return tmp_path


def test_front_door_rerun_over_files_does_not_fold_outputs_again(folder):
    invoke(list(folder.glob("*.onnx")), 0)
    second = invoke(sorted(folder.glob("*.onnx")), 0)  # the glob now includes the .folded.onnx
    assert "already folded: bnfold wrote this model and nothing is left to fold; nothing written" in second.stderr
    assert "2 already folded" in second.stderr
    assert not list(folder.glob("*.folded.folded.onnx"))


def test_front_door_already_folded_json_says_not_written(folder):
    invoke([folder / "a.onnx"], 0)
    data = json.loads(invoke([folder / "a.folded.onnx", "--json"], 0).stdout)
    assert data["output"] is None and data["not_written"].startswith("already folded")


def test_front_door_folded_model_with_bn_left_is_folded_again(folder, monkeypatch):
    """`already folded` needs both: written by bnfold, and nothing left to fold."""
    invoke([folder / "a.onnx", "--rules", "bn_into_gemm"], 0)  # folds nothing of a ConvNet: no metadata
    model = onnx.load(folder / "a.folded.onnx")
    assert not any(p.key == "bnfold.fold_sites" for p in model.metadata_props)
    again = invoke([folder / "a.folded.onnx"], 0)
    assert "-> " in again.stderr and (folder / "a.folded.folded.onnx").exists()


def test_front_door_check_json_is_a_dry_run(folder):
    result = invoke(["check", folder / "a.onnx", "--json"], 1)
    data = json.loads(result.stdout)
    before = sum(node.op_type == "BatchNormalization" for node in onnx.load(folder / "a.onnx").graph.node)
    assert data["dry_run"] is True and data["bn_before"] == data["bn_after"] == before
    assert data["bn_after_fold"] == 0 and len(data["foldable"]) == before
    assert {record["status"] for record in data["foldable"]} == {"foldable"}
    assert "folded" not in data


def test_front_door_kept_bn_points_at_standalone_affine(tmp_path, rng):
    from test_cli import conv_bn_relu_bn

    onnx.save(conv_bn_relu_bn(rng), tmp_path / "m.onnx")
    kept = invoke([tmp_path / "m.onnx"], 0)
    assert "--standalone affine replaces a kept BN by Mul + Add" in kept.stderr
    affine = invoke([tmp_path / "m.onnx", "--standalone", "affine", "-o", tmp_path / "o.onnx"], 0)
    assert "--standalone affine replaces" not in affine.stderr and "BatchNormalization: 2 -> 0" in affine.stderr


def test_front_door_python_dash_m_bnfold_is_bnfold(tmp_path):
    shutil.copy(ROOT / "models" / "mlp_bn.onnx", tmp_path / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "verification passed" in done.stderr and (tmp_path / "m.folded.onnx").exists()
    version = subprocess.run([sys.executable, "-m", "bnfold", "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and "version" in version.stdout


def test_front_door_check_several_models_worst_exit_code(folder):
    assert invoke(["check", folder / "a.onnx", folder / "b.onnx"], 1).stderr.count("foldable") >= 2
    invoke([folder / "a.onnx"], 0)
    invoke([folder / "b.onnx"], 0)
    clean = invoke(["check", folder / "a.folded.onnx", folder / "b.folded.onnx", "--json"], 0)
    assert [entry["bn_after_fold"] for entry in json.loads(clean.stdout)] == [0, 0]
    (folder / "bad.onnx").write_bytes(b"not a model")
    mixed = invoke(["check", folder / "a.folded.onnx", folder / "bad.onnx", "--json"], 2)
    assert f"bnfold: {folder / 'bad.onnx'}: error: cannot load" in mixed.stderr
    assert [entry.get("exit_code", 0) for entry in json.loads(mixed.stdout)] == [0, 2]
    assert invoke(["check", folder], 2).stderr.count("error: cannot load") == 1  # a folder: its *.onnx


def test_front_door_pre_commit_hook_runs_bnfold_check():
    hook = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert "id: bnfold-check" in hook and "entry: bnfold check" in hook and r"files: \.onnx$" in hook


def test_front_door_summary_names_the_output_as_readme_shows(tmp_path, monkeypatch):
    """README's sample line: a relative path under the current folder, not a machine's."""
    (tmp_path / "models").mkdir()
    shutil.copy(ROOT / "models" / "resnet_mini.onnx", tmp_path / "models" / "resnet_mini.onnx")
    monkeypatch.chdir(tmp_path)
    result = invoke(["models/resnet_mini.onnx"], 0)
    assert "bnfold: models/resnet_mini.onnx -> models/resnet_mini.folded.onnx" in result.stderr
    assert "bnfold: models/resnet_mini.onnx -> models/resnet_mini.folded.onnx" in (ROOT / "README.md").read_text()
