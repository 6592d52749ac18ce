"""utils.manifest: what made an artifact folder, its check, atomic writes, set-aside."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from utils.layout import MANIFEST_FILE
from utils.manifest import (
    check_folder,
    code_hash,
    config_hash,
    is_temporary,
    library_versions,
    read_manifest,
    set_aside,
    verify_manifest,
    write_atomic,
    write_manifest,
)


def _folder(tmp_path):
    root = tmp_path / "run"
    (root / "models").mkdir(parents=True)
    (root / "oof.csv").write_text("isic_id,pred\nA,0.5\n")
    (root / "models" / "m0.txt").write_bytes(b"\x00model")
    return root


def test_manifest_records_files_config_code_and_libraries(tmp_path):
    root = _folder(tmp_path)
    write_manifest(root, {"lr": 0.1, "seed": 1}, {"stage": "test"})
    record = read_manifest(root)
    assert set(record["files"]) == {"oof.csv", "models/m0.txt"}
    assert record["files"]["models/m0.txt"]["size"] == 6
    assert record["config"] == {"lr": 0.1, "seed": 1} and record["stage"] == "test"
    assert record["config_hash"] == config_hash({"seed": 1, "lr": 0.1})
    assert re.fullmatch(r"[0-9a-f]{16}", record["code_hash"])
    assert record["libraries"]["polars"] and record["libraries"]["numpy"]
    assert record["libraries"] == library_versions()
    assert verify_manifest(root) == []


def test_verify_names_changed_missing_and_extra_files(tmp_path):
    root = _folder(tmp_path)
    write_manifest(root, {})
    (root / "oof.csv").write_text("isic_id,pred\nA,0.6\n")  # same size, other content
    (root / "models" / "m0.txt").unlink()
    (root / "models" / "m1.txt").write_text("from another run")
    problems = verify_manifest(root)
    assert len(problems) == 3
    assert "oof.csv: content differs" in problems[0] or "oof.csv: content differs" in problems[1]
    assert any("m0.txt: listed in the manifest but missing" in p for p in problems)
    assert any("not in the manifest" in p and "models/m1.txt" in p for p in problems)
    (root / MANIFEST_FILE).unlink()
    assert "no manifest.json" in verify_manifest(root)[0]


def test_config_hash_ignores_key_order_and_sees_values():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_set_aside_moves_a_run_and_keeps_one_generation(tmp_path):
    root = _folder(tmp_path)
    moved = set_aside(root, log=lambda _: None)
    assert moved == tmp_path / ".previous" / "run" and not root.exists()
    assert (moved / "oof.csv").is_file()
    root.mkdir()
    (root / "new.txt").write_text("second run")
    set_aside(root, log=lambda _: None)
    assert sorted(p.name for p in moved.iterdir()) == ["new.txt"]
    assert set_aside(tmp_path / "absent") is None


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "data.json"
    write_atomic(path, json.dumps({"a": 1}))
    write_atomic(path, b'{"a": 2}')
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]


def test_check_folder_judges_each_file_and_skips_unfinished_writes(tmp_path):
    root = _folder(tmp_path)
    write_manifest(root, {})
    (root / "models" / "m0.txt").write_bytes(b"\x00mo")  # cut
    (root / "models" / ".m1.1a2b3c4d.tmp.txt").write_text("an unfinished atomic write")
    check = check_folder(root)
    assert check.has_manifest and check.unlisted == ()
    assert check.problem("oof.csv") is None
    assert "m0.txt: size 3, manifest says 6 (truncated" in check.problem("models/m0.txt")
    assert is_temporary(".m1.1a2b3c4d.tmp.txt") and not is_temporary("m1.txt")
    (root / MANIFEST_FILE).write_text('{"files": ')  # an interrupted upload
    unreadable = check_folder(root)
    assert not unreadable.has_manifest and unreadable.problem("models/m0.txt") is None
    assert "manifest unreadable" in unreadable.messages()[0]


def _code_hash_of(root: Path) -> str:
    """code_hash() as computed by a process importing utils/ from `root`."""
    command = [sys.executable, "-c", "from utils.manifest import code_hash; print(code_hash())"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_code_hash_follows_the_code_that_runs_not_its_location(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(
        repo / "utils", tmp_path / "utils", ignore=shutil.ignore_patterns("__pycache__")
    )
    copied = _code_hash_of(tmp_path)
    assert copied == code_hash()  # same files elsewhere: same hash
    metric = tmp_path / "utils" / "metric.py"
    metric.write_text(metric.read_text() + "\n# one edited line\n")
    assert _code_hash_of(tmp_path) != copied
