"""utils.kaggle.build: metadata rules, self-contained builds, the kaggle client's push offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from io import BytesIO
from pathlib import Path

import nbformat
import pytest
from notebook_checks import write_standin_notebook

from utils.kaggle import build as kb, embed as ke, input as ki, metadata as km

REPO = Path(__file__).resolve().parents[1]
PROBE = "probe_kernel"


def _write_json(path: Path, data: dict) -> None:
    """Write a metadata file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _edit(path: Path, **changes) -> None:
    """Change (value) or drop (None) keys of a metadata file."""
    data = kb.read_json(path)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    _write_json(path, data)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the committed kernels/ and top-level metadata to break on purpose."""
    shutil.copytree(kb.KERNELS_DIR, tmp_path / "kernels")
    shutil.copy(kb.TOP_LEVEL_METADATA, tmp_path / kb.KERNEL_METADATA)
    return tmp_path


def _problems(tree: Path) -> list[str]:
    """validate() on the copied tree."""
    return kb.validate(tree / "kernels", tree / kb.KERNEL_METADATA)


def test_committed_metadata_is_valid():
    assert kb.validate() == []


def test_every_stage_has_one_kernel_folder_and_the_top_level_is_the_submission():
    names = {p.name for p in kb.kernel_folders()}
    assert names == {
        "01_image_convnextv2_nano", "01_image_vit_tiny", "01_image_vit_tiny_suspicious",
        "01_image_vit_small_suspicious", "02_tune_gbdt", "03_gbdt", "04_inference",
        "00_probe_cpu", "00_probe_gpu", "06_ablation",
    }  # fmt: skip
    top = kb.read_json(kb.TOP_LEVEL_METADATA)
    assert top["enable_internet"] is False and top["enable_gpu"] is True
    assert top["machine_shape"] == "NvidiaTeslaT4"
    assert top["competition_sources"] == ["isic-2024-challenge"]
    assert set(kb.defined_datasets()) == set(kb.DATASET_CONTENTS)


BREAKS = [
    ("04_inference", {"enable_internet": True}, "must set enable_internet false"),
    ("03_gbdt", {"enable_internet": None}, "missing required field(s) ['enable_internet']"),
    ("03_gbdt", {"enable_internet": "false"}, "enable_internet must be JSON true/false"),
    ("01_image_vit_tiny", {"id": "fusionnetx/FusionNetX_ViT"}, "must match"),
    ("01_image_vit_tiny", {"id": "fusionnetx/vit"}, "must be 5..50 characters"),
    ("01_image_vit_tiny", {"title": "FusionNetX ViT Tiny"}, "slugifies to 'fusionnetx-vit-tiny'"),
    ("01_image_vit_tiny", {"machine_shape": "NvidiaTeslaP100"}, "needs machine_shape"),
    ("01_image_vit_tiny", {"machine_shape": None}, "needs machine_shape 'NvidiaTeslaT4'"),
    ("03_gbdt", {"dataset_sources": ["someone/weights-x"]}, "neither defined in kernels/datasets"),
    (
        "03_gbdt",
        {"dataset_sources": []},
        "parameters read input 'fusionnetx-isic2024-image-models'",
    ),
    ("03_gbdt", {"competition_sources": []}, "competition_sources must be"),
    ("03_gbdt", {"code_file": "gbdt.ipynb"}, "code_file must be 03_gbdt.ipynb"),
    ("03_gbdt", {"kernel_type": "script"}, "kernel_type must be 'notebook'"),
]


@pytest.mark.parametrize(("kernel", "changes", "expected"), BREAKS)
def test_validate_names_each_broken_rule(tree: Path, kernel: str, changes: dict, expected: str):
    path = tree / "kernels" / kernel / kb.KERNEL_METADATA
    _edit(path, **changes)
    problems = _problems(tree)
    assert any(expected in p and str(path) in p for p in problems), problems


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"licenses": [{"name": "MIT"}]}, "license 'MIT' is not one Kaggle accepts"),
        ({"licenses": []}, "exactly one entry"),
        ({"title": "Mods"}, "6..50 characters"),
        ({"subtitle": "too short"}, "subtitle must be 20..80"),
        ({"id": "fusionnetx/other-name"}, "folder name must equal the dataset slug"),
        ({"title": "FusionNetX GBDT model files"}, "slugifies to 'fusionnetx-gbdt-model-files'"),
    ],
)
def test_validate_checks_dataset_metadata(tree: Path, changes: dict, expected: str):
    path = tree / "kernels" / "datasets" / kb.GBDT_DATASET / kb.DATASET_METADATA
    _edit(path, **changes)
    assert any(expected in p for p in _problems(tree))


def test_top_level_must_mirror_the_submission_kernel(tree: Path):
    _edit(tree / kb.KERNEL_METADATA, enable_internet=True)
    assert any("differs from" in p and "enable_internet" in p for p in _problems(tree))


def test_top_level_metadata_follows_the_build_owner(tree: Path, tmp_path: Path):
    top = tree / kb.KERNEL_METADATA
    before = top.read_text()
    assert not kb.write_top_level(tmp_path / "elsewhere", "alice", top, tree / "kernels")
    assert top.read_text() == before  # a build outside build/kernels leaves it alone
    assert kb.write_top_level(kb.DEFAULT_BUILD_DIR, "alice", top, tree / "kernels")
    meta = kb.read_json(top)
    assert meta["id"] == "alice/fusionnetx-isic2024-submission"
    assert meta["dataset_sources"] == [f"alice/{kb.IMAGE_DATASET}", f"alice/{kb.GBDT_DATASET}"]
    assert meta["code_file"] == km.TOP_LEVEL_CODE_FILE
    assert _problems(tree) == []
    _edit(top, dataset_sources=[f"fusionnetx/{kb.IMAGE_DATASET}", f"alice/{kb.GBDT_DATASET}"])
    assert any("dataset_sources" in p for p in _problems(tree))


def test_input_path_finds_files_in_any_mount_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ki.KAGGLE_INPUT_ENV, str(tmp_path))
    (tmp_path / "competitions" / "isic-2024-challenge").mkdir(parents=True)
    (tmp_path / "competitions" / "isic-2024-challenge" / "test-metadata.csv").write_text("x")
    (tmp_path / "my-models" / "v1" / "gbdt").mkdir(parents=True)
    comp = ki.input_path("isic-2024-challenge", "test-metadata.csv")
    assert comp == tmp_path / "competitions" / "isic-2024-challenge" / "test-metadata.csv"
    assert ki.input_path("my-models", "gbdt") == tmp_path / "my-models" / "v1" / "gbdt"
    with pytest.raises(FileNotFoundError, match=r"'my-models' \(mounted at .*\) has no 'vit'"):
        ki.input_path("my-models", "vit")
    with pytest.raises(FileNotFoundError, match=r"'absent' \(not mounted\).*\['competitions'"):
        ki.input_path("absent", "gbdt")
    linked = ki.link_inputs({"gbdt": "my-models", "vit_tiny": "my-models"}, tmp_path / "joined")
    assert (linked / "gbdt").resolve() == (tmp_path / "my-models" / "v1" / "gbdt").resolve()
    assert sorted(p.name for p in linked.iterdir()) == ["gbdt"]
    assert "WARNING: vit_tiny left out" in capsys.readouterr().err


def test_utils_archive_is_deterministic_and_holds_the_package():
    archive = ke.utils_archive()
    assert archive == ke.utils_archive()
    names = zipfile.ZipFile(BytesIO(archive)).namelist()
    assert {"utils/__init__.py", "utils/kaggle/build.py", "utils/metric.py"} <= set(names)
    assert not any("__pycache__" in n or not n.endswith(".py") for n in names)


def code_sources(path: Path) -> list[str]:
    """Source of every code cell of a notebook."""
    return [
        cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"
    ]


def test_a_kernel_embeds_only_the_modules_it_imports():
    def embedded(kernel: str) -> set[str]:
        sources = code_sources(kb.NOTEBOOKS_DIR / f"{kernel}.ipynb")
        return {p.relative_to(REPO).as_posix() for p in ke.kernel_modules(sources)}

    submission, gbdt = embedded(kb.SUBMISSION_KERNEL), embedded("03_gbdt")
    settings = {
        f"utils/settings/{name}.py" for name in ("__init__", "configs", "presets", "recipes")
    }
    generator = {
        f"utils/{name}.py" for name in ("synthetic", "synthetic_images", "synthetic_metadata")
    }
    pipeline = {f"utils/{name}.py" for name in ("pipeline", "pipeline_runner", "pipeline_stages")}
    for files in (submission, gbdt):
        assert {"utils/__init__.py", "utils/kaggle/input.py", *settings} <= files
        assert not files & {*pipeline, *generator, "utils/kaggle/build.py"}
    assert "utils/image/models.py" in submission and "utils/image/layers/gem.py" in submission
    assert "utils/image/models.py" not in gbdt  # a CPU kernel carries no torch code
    assert "utils/metric.py" in gbdt


def test_owner_fills_kernel_id_and_repo_datasets_only():
    meta = {"id": "fusionnetx/abcde-fgh", "dataset_sources": ["fusionnetx/mine", "pub/theirs"]}
    out = kb.with_owner(meta, "alice", {"fusionnetx/mine"})
    assert out == {"id": "alice/abcde-fgh", "dataset_sources": ["alice/mine", "pub/theirs"]}
    with pytest.raises(kb.KaggleBuildError, match="'Alice Smith' is not a Kaggle user name"):
        kb.with_owner(meta, "Alice Smith", set())


def test_input_path_takes_the_highest_version_and_the_owners_mount(tmp_path, monkeypatch):
    monkeypatch.setenv(ki.KAGGLE_INPUT_ENV, str(tmp_path))
    for version in (1, 2, 10):
        (tmp_path / "datasets" / "alice" / "models" / "versions" / str(version) / "gbdt").mkdir(
            parents=True
        )
    (tmp_path / "datasets" / "bob" / "models" / "gbdt").mkdir(parents=True)
    mine = tmp_path / "datasets" / "alice" / "models" / "versions" / "10" / "gbdt"
    assert ki.input_path("models", "gbdt", owner="alice") == mine
    assert ki.input_path("models", "gbdt", owner="bob").parts[-3:] == ("bob", "models", "gbdt")
    with pytest.raises(FileNotFoundError, match="none under the owner 'carol'"):
        ki.input_path("models", "gbdt", owner="carol")
    linked = ki.link_inputs({"gbdt": "models"}, tmp_path / "joined", owner="alice")
    assert (linked / "gbdt").resolve() == mine.resolve()


def test_built_parameters_name_the_owner_of_repo_datasets_only():
    source = km.injected_source(kb.KAGGLE_PARAMETERS[kb.SUBMISSION_KERNEL], "alice")
    assert "input_path('isic-2024-challenge', 'test-metadata.csv')" in source
    assert f"'gbdt': '{kb.GBDT_DATASET}'}}, owner='alice')" in source
    assert "from utils.kaggle.input import input_path, link_inputs" in source


def test_resolve_owner_reads_the_kaggle_clients_configuration(tmp_path, monkeypatch):
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(KaggleApi, "config", str(tmp_path / "kaggle.json"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with pytest.raises(kb.KaggleBuildError, match="no Kaggle user name: pass --owner NAME"):
        kb.resolve_owner(None)
    (tmp_path / "kaggle.json").write_text(json.dumps({"username": "carol", "key": "k"}))
    assert kb.resolve_owner(None) == "carol"
    monkeypatch.setenv("KAGGLE_USERNAME", "bob")
    assert kb.resolve_owner(None) == "bob"
    assert kb.resolve_owner("alice") == "alice"


def test_build_cli_without_a_user_stops_before_writing(tmp_path, monkeypatch, capsys):
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(KaggleApi, "config", str(tmp_path / "kaggle.json"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    assert kb.main(["build", "--out", str(tmp_path / "build")]) == 1
    assert "no Kaggle user name" in capsys.readouterr().err
    assert not (tmp_path / "build").exists()


def test_min_versions_are_the_kaggle_requirements_pins():
    pins = {}
    for line in (REPO / "requirements-kaggle.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    for lib, (dists, oldest) in ki.MIN_VERSIONS.items():
        pinned = [pins[d] for d in dists if d in pins]
        assert pinned == [oldest], (lib, dists, pinned)


def test_installed_libraries_pass_the_version_check(capsys):
    versions = ki.check_versions()
    assert all(versions.values())
    assert capsys.readouterr().out.startswith("libraries: torch ")


def test_every_checked_library_has_an_import_name():
    assert sorted(ki.IMPORT_NAMES.values()) == sorted(ki.MIN_VERSIONS)
    assert set(ki.KNOWN_INCOMPATIBLE) <= set(ki.MIN_VERSIONS)


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ({"timm": "0.6.13"}, "timm 0.6.13 is known not to work (needs >= 0.9.0): create_model"),
        ({"torch": "2.1.2+cu121"}, "torch 2.1.2+cu121 is known not to work (needs >= 2.3.0)"),
        ({"polars": "0.18.15"}, "polars 0.18.15 is known not to work (needs >= 0.19.0)"),
    ],
)
def test_a_known_bad_version_stops_the_kernel_in_one_line(monkeypatch, capsys, found, expected):
    monkeypatch.delenv(ki.SKIP_VERSION_CHECK_ENV, raising=False)
    versions = {**ki.installed_versions(), **found}
    with pytest.raises(ki.LibraryVersionError, match=re.escape(expected)) as err:
        ki.check_versions(versions=versions)
    assert "\n" not in str(err.value) and "--skip-version-check" in str(err.value)
    assert ki.check_versions(versions=versions, stop=False) == versions
    assert expected in capsys.readouterr().err
    monkeypatch.setenv(ki.SKIP_VERSION_CHECK_ENV, "1")
    assert ki.check_versions(versions=versions) == versions


@pytest.mark.parametrize(
    ("found", "warning"),
    [
        ({"optuna": "4.2.1"}, "optuna 4.2.1 differs from the tested 5.0.0"),
        ({"timm": "1.0.20"}, "timm 1.0.20 differs from the tested 1.0.26"),
        ({"catboost": "1.2.11"}, "catboost 1.2.11 differs from the tested 1.2.10"),
        ({"polars": None}, "polars is not installed (tested with 1.35.2)"),
    ],
)
def test_any_other_difference_only_warns(monkeypatch, capsys, found, warning):
    monkeypatch.delenv(ki.SKIP_VERSION_CHECK_ENV, raising=False)
    versions = {**ki.installed_versions(), **found}
    assert ki.check_versions(versions=versions) == versions
    assert f"WARNING: {warning}" in capsys.readouterr().err.splitlines()


def test_each_kernel_checks_only_the_libraries_it_imports():
    def libraries(kernel: str) -> list[str]:
        code = code_sources(kb.NOTEBOOKS_DIR / f"{kernel}.ipynb")
        code.append(km.injected_source(kb.KAGGLE_PARAMETERS[kernel]))
        return ke.kernel_libraries(ke.utils_archive(ke.kernel_modules(code)), code)

    submission, tuning, image = (
        libraries(k) for k in ("04_inference", "02_tune_gbdt", "01_image_vit_tiny")
    )
    assert "optuna" not in submission and "optuna" in tuning
    assert {"torch", "timm", "polars", "lightgbm"} <= set(submission)
    assert "timm" not in tuning and "lightgbm" not in image


GATE_RUNNER = """\
import importlib.metadata, json, os, sys
fake = json.loads(os.environ["FAKE_VERSIONS"])
real = importlib.metadata.version
importlib.metadata.version = lambda name: fake.get(name) or real(name)
exec(open(sys.argv[1]).read())
"""


def _run_gate(built: Path, fake: dict[str, str]) -> subprocess.CompletedProcess:
    """The built kernel's bootstrap cell, run off the repo with library versions faked."""
    cells = nbformat.read(next(built.glob("*.ipynb")), as_version=4).cells
    (built / "bootstrap.py").write_text(cells[0].source)
    (built / "gate.py").write_text(GATE_RUNNER)
    (built / "tmp").mkdir(exist_ok=True)
    dropped = ("PYTHONPATH", ki.SKIP_VERSION_CHECK_ENV)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(FAKE_VERSIONS=json.dumps(fake), TMPDIR=str(built / "tmp"))
    cmd = [sys.executable, "gate.py", "bootstrap.py"]
    return subprocess.run(cmd, cwd=built, env=env, capture_output=True, text=True, timeout=120)


def test_built_submission_kernel_passes_its_gate_with_an_old_optuna_and_stops_on_a_bad_timm(
    tmp_path,
):
    def build(out: str, skip: bool = False) -> Path:
        return kb.build_kernel(
            kb.KERNELS_DIR / kb.SUBMISSION_KERNEL, tmp_path / out, "alice",
            kb.KAGGLE_PARAMETERS[kb.SUBMISSION_KERNEL], skip_version_check=skip,
        )  # fmt: skip

    built = build("build")
    old_optuna = _run_gate(built, {"optuna": "3.6.1", "catboost": "1.2.7"})
    assert old_optuna.returncode == 0, old_optuna.stderr
    assert "optuna" not in old_optuna.stdout + old_optuna.stderr  # never imported, never checked
    assert "WARNING: catboost 1.2.7 differs from the tested 1.2.10" in old_optuna.stderr
    bad_timm = _run_gate(built, {"timm": "0.6.13"})
    assert bad_timm.returncode != 0
    assert "LibraryVersionError: timm 0.6.13 is known not to work (needs >= 0.9.0): " in (
        bad_timm.stderr
    )
    assert "pretrained_cfg_overlay" in bad_timm.stderr
    skipped = _run_gate(build("skip", skip=True), {"timm": "0.6.13"})
    assert skipped.returncode == 0, skipped.stderr
    assert "WARNING: timm 0.6.13 is known not to work" in skipped.stderr


def test_build_cli_has_skip_version_check(tmp_path, capsys):
    code = kb.main(["build", "--owner", "alice", "--out", str(tmp_path), "--skip-version-check"])
    assert code == 0
    source = nbformat.read(tmp_path / "03_gbdt" / "03_gbdt.ipynb", as_version=4).cells[0].source
    assert "stop=False" in source and "'optuna'" not in source


def test_release_orders_versions_by_number():
    assert ki.release("2.10.0+cu128") == (2, 10, 0) > ki.release("2.9.1")
    assert ki.release("1.0.26rc1") == (1, 0, 26) and ki.release("4.13.0.92") == (4, 13, 0, 92)


PROBE_BODY = """\
import json, os
from pathlib import Path
import utils
from utils.io import read_metadata
from utils.metric import pauc
test = read_metadata(Path(data_dir) / "test-metadata.csv", "test")
Path(output_dir, "probe.json").write_text(json.dumps({
    "utils_file": utils.__file__,
    "rows": test.height,
    "artifacts": sorted(os.listdir(artifacts_dir)),
    "pauc": pauc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]),
}))
"""


@pytest.fixture
def probe(tmp_path: Path, fixtures_dir: Path) -> dict[str, Path]:
    """A probe kernel (metadata + notebook using utils) and a fake /kaggle/input tree."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_standin_notebook(
        notebooks / f"{PROBE}.ipynb", ["data_dir", "output_dir", "artifacts_dir"], PROBE_BODY
    )
    meta = kb.read_json(kb.KERNELS_DIR / kb.SUBMISSION_KERNEL / kb.KERNEL_METADATA)
    _write_json(
        tmp_path / "kernels" / PROBE / kb.KERNEL_METADATA, {**meta, "code_file": f"{PROBE}.ipynb"}
    )
    inputs = tmp_path / "input"
    comp = inputs / "competitions" / kb.COMPETITION  # a nested mount layout on purpose
    comp.mkdir(parents=True)
    for name in ("test-metadata.csv", "test-image.hdf5"):
        shutil.copy(fixtures_dir / name, comp / name)
    (inputs / kb.GBDT_DATASET / "gbdt").mkdir(parents=True)
    return {
        "root": tmp_path,
        "notebooks": notebooks,
        "kernel": tmp_path / "kernels" / PROBE,
        "inputs": inputs,
    }


PROBE_PARAMETERS = {
    "data_dir": kb.InputPath(kb.COMPETITION, "test-metadata.csv", parent=True),
    "output_dir": ".",
    "artifacts_dir": km.LinkedInputs((("gbdt", kb.GBDT_DATASET),)),
}


def _papermill_off_repo(notebook: Path, cwd: Path, inputs: Path) -> subprocess.CompletedProcess:
    """Execute a notebook in cwd with no PYTHONPATH: the repository is not importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({ki.KAGGLE_INPUT_ENV: str(inputs), "TMPDIR": str(cwd / "tmp")})
    (cwd / "tmp").mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "papermill", notebook.name, "executed.ipynb", "-k", "python3"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_built_kernel_runs_with_the_repository_off_sys_path(probe):
    built = kb.build_kernel(
        probe["kernel"], probe["root"] / "build", "alice", PROBE_PARAMETERS, probe["notebooks"]
    )
    cells = nbformat.read(built / f"{PROBE}.ipynb", as_version=4).cells
    assert km.BOOTSTRAP_TAG in cells[0].metadata.tags
    assert cells[1].metadata.tags == ["parameters"] and cells[2].metadata.tags == [
        "injected-parameters"
    ]
    assert kb.read_json(built / kb.KERNEL_METADATA)["id"] == "alice/fusionnetx-isic2024-submission"

    elsewhere = probe["root"] / "elsewhere"
    shutil.copytree(built, elsewhere)
    done = _papermill_off_repo(elsewhere / f"{PROBE}.ipynb", elsewhere, probe["inputs"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((elsewhere / "probe.json").read_text())
    assert Path(result["utils_file"]).is_relative_to(elsewhere / "tmp")
    assert not Path(result["utils_file"]).is_relative_to(REPO)
    assert result["rows"] == 3 and result["artifacts"] == ["gbdt"]
    assert result["pauc"] == pytest.approx(0.2)


def test_unbuilt_notebook_cannot_import_utils_off_repo(probe):
    """Control for the test above: without the bootstrap, the same run cannot find utils."""
    raw = probe["root"] / "raw"
    raw.mkdir()
    shutil.copy(probe["notebooks"] / f"{PROBE}.ipynb", raw)
    done = _papermill_off_repo(raw / f"{PROBE}.ipynb", raw, probe["inputs"])
    assert done.returncode != 0 and "No module named 'utils'" in done.stderr


def test_kaggle_client_push_dry_run_sends_the_built_notebook(probe):
    built = kb.build_kernel(
        probe["kernel"], probe["root"] / "build", "alice", PROBE_PARAMETERS, probe["notebooks"],
        frozenset(kb.defined_datasets().values()),
    )  # fmt: skip
    request = kb.dry_run_push(built)
    assert request.slug == "alice/fusionnetx-isic2024-submission"
    assert request.new_title == "FusionNetX ISIC2024 Submission"
    assert request.enable_internet is False and request.enable_gpu is True
    assert request.machine_shape == "NvidiaTeslaT4"
    assert request.competition_data_sources == ["isic-2024-challenge"]
    assert request.dataset_data_sources == [
        f"alice/{kb.IMAGE_DATASET}", f"alice/{kb.GBDT_DATASET}",
    ]  # fmt: skip
    sent = json.loads(request.text)
    assert sent["cells"][0]["metadata"]["tags"] == [km.BOOTSTRAP_TAG]
    assert "base64.b64decode" in sent["cells"][0]["source"]


def test_kaggle_client_rejects_a_build_without_its_notebook(probe):
    built = kb.build_kernel(
        probe["kernel"], probe["root"] / "build", "alice", PROBE_PARAMETERS, probe["notebooks"]
    )
    (built / f"{PROBE}.ipynb").unlink()
    with pytest.raises(ValueError, match="Source file not found"):
        kb.dry_run_push(built)


def test_build_requires_the_notebook_and_its_parameters_cell(probe):
    (probe["notebooks"] / f"{PROBE}.ipynb").unlink()
    with pytest.raises(kb.KaggleBuildError, match=f"notebook .*{PROBE}.ipynb does not exist"):
        kb.build_kernel(probe["kernel"], probe["root"] / "b", "alice", {}, probe["notebooks"])
    nbformat.write(nbformat.v4.new_notebook(), probe["notebooks"] / f"{PROBE}.ipynb")
    with pytest.raises(kb.KaggleBuildError, match="no cell tagged 'parameters'"):
        kb.build_kernel(probe["kernel"], probe["root"] / "b", "alice", {}, probe["notebooks"])


def dry_run_dataset_create(folder: Path) -> tuple:
    """Run the real `kaggle datasets create` on folder offline; (request, resources uploaded)."""
    from requests import HTTPError

    api, client = kb.kaggle_api(), kb._CapturingClient()
    owner = kb.split_ref(kb.read_json(folder / kb.DATASET_METADATA)["id"])[0]
    api.config_values = {**getattr(api, "config_values", {}), api.CONFIG_NAME_USER: owner}
    api.build_kaggle_client = lambda: client
    uploads: list = []

    def not_found(*args, **kwargs) -> None:
        raise HTTPError("404: dry run, dataset does not exist yet")

    api.dataset_status = not_found
    api.upload_files = lambda request, resources, *args, **kwargs: uploads.append(resources)
    result = api.dataset_create_new(str(folder))
    assert not result.error, f"{folder}: {result.error}"
    return client.requests[-1], uploads


@pytest.mark.parametrize("slug", sorted(kb.DATASET_CONTENTS))
def test_every_dataset_passes_the_kaggle_client_create_dry_run(tmp_path: Path, slug: str):
    source = tmp_path / "artifacts"
    for name in kb.DATASET_CONTENTS[slug]:
        target = source / name
        if name.endswith(".pth"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"weights")
        else:
            target.mkdir(parents=True)
            (target / "oof.csv").write_text("isic_id\n")
    folder = kb.build_dataset(slug, source, tmp_path / "out", owner="alice")
    request, uploads = dry_run_dataset_create(folder)
    assert (request.owner_slug, request.slug) == ("alice", slug)
    assert request.is_private is True and request.license_name in km.KAGGLE_LICENSES
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [kb.DATASET_METADATA, *kb.DATASET_CONTENTS[slug]]
    )
    assert uploads == [None]


def test_dataset_build_names_missing_artifacts(tmp_path: Path):
    (tmp_path / "vit_tiny").mkdir()
    with pytest.raises(kb.KaggleBuildError, match=r"missing \['convnextv2_nano', 'vit_tiny_s"):
        kb.build_dataset(kb.IMAGE_DATASET, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kernel", sorted(p.name for p in kb.kernel_folders()))
def test_real_kernel_builds_validates_and_passes_the_client_dry_run(tmp_path: Path, kernel: str):
    """Needs notebooks/<kernel>.ipynb (fails, naming it, until that notebook exists)."""
    out = tmp_path / "build"
    datasets = frozenset(kb.defined_datasets().values())
    built = kb.build_kernel(
        kb.KERNELS_DIR / kernel, out, "alice", kb.KAGGLE_PARAMETERS[kernel], kb.NOTEBOOKS_DIR,
        datasets,
    )  # fmt: skip
    meta = kb.read_json(built / kb.KERNEL_METADATA)
    assert km._built_problems(built, meta) == []
    request = kb.dry_run_push(built)
    assert request.slug.startswith("alice/") and request.enable_internet is False
    assert all(ref.startswith("alice/") for ref in request.dataset_data_sources)
    cells = json.loads(request.text)["cells"]
    injected = next(
        c["source"] for c in cells if "injected-parameters" in c["metadata"].get("tags", [])
    )
    assert "output_dir = '/kaggle/working'" in injected


def test_built_vit_kernel_trains_from_the_weights_dataset_off_repo(tmp_path, synthetic_dir):
    """The real 01_image_vit_tiny kernel, built and run as Kaggle would (inputs mounted, repo
    off sys.path, pretrained file from the weights dataset), at demo size, in two sessions: the
    first trains fold 0 only, the second is built with --continue and mounts the first one's
    output. The first session is the run that crashed on Kaggle's timm 1.0.26 when the .pth was
    read as a JAX .npz."""
    import timm
    import torch

    from utils.image.models import BACKBONES

    inputs = tmp_path / "input"
    shutil.copytree(synthetic_dir, inputs / "competitions" / kb.COMPETITION)
    weights = inputs / kb.WEIGHTS_DATASET / "vit_tiny.pth"
    weights.parent.mkdir(parents=True)
    torch.save(timm.create_model(BACKBONES["vit_tiny"].timm_name).state_dict(), weights)
    kernel, folder = "01_image_vit_tiny", kb.KERNELS_DIR / "01_image_vit_tiny"
    demo = {"output_dir": ".", "preset": "demo", "n_folds": 2, "epochs": 1, "image_size": 32}
    params = {**kb.KAGGLE_PARAMETERS[kernel], **demo, "num_workers": 0}

    first, _ = kb.image_kernel_parameters(folder, params, [0], continue_run=False)
    built = kb.build_kernel(folder, tmp_path / "build1", "alice", first)
    done = _papermill_off_repo(built / f"{kernel}.ipynb", built, inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.dumps(str(weights)) in (built / "vit_tiny" / "config.json").read_text()
    assert (built / "vit_tiny" / "fold0.pt").is_file()
    assert not (built / "vit_tiny" / "oof.csv").exists()  # fold 1 remains
    executed = (built / "executed.ipynb").read_text()
    assert "libraries: torch " in executed and "timm " in executed

    slug = "fusionnetx-isic2024-vit-tiny"  # Kaggle mounts a kernel's output under its slug
    shutil.copytree(built / "vit_tiny", inputs / slug / "vit_tiny")
    second, kernels = kb.image_kernel_parameters(folder, params, [1], continue_run=True)
    assert kernels == (slug,)
    again = kb.build_kernel(folder, tmp_path / "build2", "alice", second, kernel_sources=kernels)
    assert kb.read_json(again / kb.KERNEL_METADATA)["kernel_sources"] == [f"alice/{slug}"]
    done = _papermill_off_repo(again / f"{kernel}.ipynb", again, inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    oof = (again / "vit_tiny" / "oof.csv").read_text().splitlines()
    assert len(oof) == 1 + 1500  # every training row once: fold 0 reused, fold 1 trained
    assert (again / "vit_tiny" / "fold0.pt").read_bytes() == (
        built / "vit_tiny" / "fold0.pt"
    ).read_bytes()


def test_continue_build_renders_the_kernels_own_output_and_folds(tmp_path):
    out = kb.build_all(tmp_path / "b", "alice", folds=[2, 3], continue_run=True)
    image = next(p for p in out if p.name == "01_image_vit_small_suspicious")
    meta = kb.read_json(image / kb.KERNEL_METADATA)
    assert meta["kernel_sources"] == ["alice/fusionnetx-isic2024-vit-small-suspicious"]
    cells = json.loads((image / meta["code_file"]).read_text())["cells"]
    injected = next(
        "".join(c["source"]) for c in cells if km.INJECTED_TAG in c["metadata"].get("tags", [])
    )
    assert "folds = [2, 3]" in injected
    assert (
        "resume_from = str(input_path('fusionnetx-isic2024-vit-small-suspicious', "
        "'vit_small_suspicious', owner='alice').parent)"
    ) in injected
    request = kb.dry_run_push(image)
    assert request.kernel_data_sources == ["alice/fusionnetx-isic2024-vit-small-suspicious"]
    gbdt = kb.read_json(next(p for p in out if p.name == "03_gbdt") / kb.KERNEL_METADATA)
    assert not gbdt.get("kernel_sources")
