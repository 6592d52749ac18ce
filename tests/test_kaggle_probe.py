"""utils.kaggle.probe: the probe run for real here, its comparison with requirements-kaggle.txt,
the built probe kernels, and how utils.kaggle.run reports a probe before any long kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_kaggle_run as base
from test_kaggle_run import FakeKaggle, run, state_of

from utils.kaggle import build as kb, input as ki, probe, run as kr

REPO = Path(__file__).resolve().parents[1]
PINS = probe.requirement_pins((REPO / "requirements-kaggle.txt").read_text())
build_once, weights_dir = base.build_once, base.weights_dir


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> Path:
    """An emulated /kaggle/input: the competition mounted, one dataset nested deeper."""
    root = tmp_path / "input"
    comp = root / "competitions" / kb.COMPETITION
    comp.mkdir(parents=True)
    (comp / "train-metadata.csv").write_text("isic_id\n")
    (root / "datasets" / "alice" / kb.WEIGHTS_DATASET).mkdir(parents=True)
    monkeypatch.setenv(ki.KAGGLE_INPUT_ENV, str(root))
    return root


def test_the_probe_reports_this_machine(inputs, tmp_path, capsys):
    path = probe.write_probe("cpu", tmp_path / "working")
    found = json.loads(path.read_text())
    assert path.name == "probe-cpu.json"
    assert found["python"] == ".".join(map(str, sys.version_info[:3]))
    assert found["cpu_count"] == os.cpu_count() and found["memory_gib"] > 0
    assert found["disk"]["total_gib"] >= found["disk"]["free_gib"] > 0
    assert set(found["libraries"]) == set(ki.MIN_VERSIONS)
    import timm

    assert found["libraries"]["timm"] == timm.__version__
    accelerator = found["accelerator"]
    assert accelerator["gpu_count"] == 0 and accelerator["cuda_available"] is False
    assert found["inputs"] == {
        "competitions/": {kb.COMPETITION + "/": {"train-metadata.csv": 8}},
        "datasets/": {"alice/": {kb.WEIGHTS_DATASET + "/": {}}},
    }
    assert json.loads(capsys.readouterr().out) == found


def test_a_large_folder_is_listed_in_part(tmp_path):
    for i in range(probe.LAYOUT_FILES + 5):
        (tmp_path / f"ISIC_{i:07d}.jpg").write_bytes(b"x")
    layout = probe.input_layout(tmp_path)
    assert len(layout) == probe.LAYOUT_FILES + 1 and layout["..."] == 5


def test_requirement_pins_map_distributions_to_the_checked_libraries():
    assert PINS["timm"] == "1.0.26" and PINS["xgboost"] == "3.2.0"
    assert PINS["opencv"] == "4.13.0.92"  # pinned as opencv-python-headless
    assert set(PINS) == set(ki.MIN_VERSIONS)


def _probe(image: str, **libraries) -> dict:
    gpus = [{"name": "Tesla T4", "capability": "7.5", "memory_gib": 14.74}] * 2
    return {
        "image": image,
        "libraries": {**PINS, **libraries},
        "accelerator": {
            "gpu_count": 2 if image == "gpu" else 0,
            "gpus": gpus[: 2 * (image == "gpu")],
        },
    }


def test_differences_name_each_library_and_the_hardware():
    assert probe.differences(_probe("gpu"), PINS) == ([], [])
    found = _probe("gpu", optuna="4.5.0", catboost=None)
    found["accelerator"] = {"gpu_count": 1, "gpus": [{"capability": "6.0"}]}
    blocking, notes = probe.differences(found, PINS)
    assert blocking == []
    assert notes == [
        "gpu image: catboost is not installed (pinned 1.2.10)",
        "gpu image: optuna 4.5.0 (requirements-kaggle.txt: 5.0.0)",
        "gpu image: 1 GPUs, planned for 2",
        "gpu image: compute capability ['6.0'], planned 7.5",
    ]
    blocking, _ = probe.differences(_probe("cpu", polars="0.18.4"), PINS)
    assert blocking == [
        "cpu image: polars 0.18.4 is known not to work (needs >= 0.19.0): "
        + ki.KNOWN_INCOMPATIBLE["polars"][1]
    ]


def test_the_run_stores_the_probes_and_prints_each_difference(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.probes["00_probe_gpu"] = _probe("gpu", timm="1.0.24")
    fake.probes["00_probe_cpu"] = _probe("cpu")
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    probe_lines = [line for line in lines if line.startswith("probe ")]
    assert "differs: gpu image: timm 1.0.24 (requirements-kaggle.txt: 1.0.26)" in probe_lines[-1]
    assert "00_probe_cpu: as requirements-kaggle.txt pins" in " ".join(probe_lines)
    first_image = next(i for i, line in enumerate(lines) if line.startswith("images"))
    assert lines.index(probe_lines[-1]) < first_image  # printed before any long kernel
    assert state_of(tmp_path)["probes"]["gpu"]["libraries"]["timm"] == "1.0.24"


def test_a_known_bad_library_in_an_image_stops_before_any_long_kernel(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.probes["00_probe_gpu"] = _probe("gpu", timm="0.6.13")
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "STOPPED at step 'probe'" in stopped and "timm 0.6.13 is known not to work" in stopped
    assert [c[1] for c in fake.actions()] == list(kr.PROBE_KERNELS)


def test_probe_kernels_are_built_never_to_stop_on_a_version(tmp_path):
    built = kb.build_all(tmp_path / "b", "alice")
    for kernel in kr.PROBE_KERNELS:
        folder = next(p for p in built if p.name == kernel)
        meta = kb.read_json(folder / kb.KERNEL_METADATA)
        assert meta["enable_internet"] is False and meta["dataset_sources"] == []
        assert meta["enable_gpu"] is (kernel == "00_probe_gpu")
        source = json.loads((folder / meta["code_file"]).read_text())["cells"][0]["source"]
        assert "stop=False" in "".join(source)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", kr.PROBE_KERNELS)
def test_built_probe_kernel_runs_off_the_repo_against_an_emulated_input(tmp_path, kernel):
    inputs = tmp_path / "input"
    comp = inputs / kb.COMPETITION
    comp.mkdir(parents=True)
    (comp / "test-metadata.csv").write_text("isic_id\n")
    built = kb.build_kernel(
        kb.KERNELS_DIR / kernel, tmp_path / "build", "alice",
        {**kb.KAGGLE_PARAMETERS[kernel], "output_dir": "."}, skip_version_check=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(built, elsewhere)
    (elsewhere / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({ki.KAGGLE_INPUT_ENV: str(inputs), "TMPDIR": str(elsewhere / "tmp")})
    cmd = [sys.executable, "-m", "papermill", f"{kernel}.ipynb", "out.ipynb", "-k", "python3"]
    done = subprocess.run(
        cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((elsewhere / kr.PRODUCES[kernel]).read_text())
    assert found["image"] == kernel.rsplit("_", 1)[1]
    assert found["inputs"] == {kb.COMPETITION + "/": {"test-metadata.csv": 8}}


SMOKE_OK = {
    "device": "cuda:0",
    "gpus": 1,
    "models": {
        "vit_tiny": {"train_images_per_s": 812.5, "infer_images_per_s": 2410.0,
                     "peak_gpu_memory_gib": 3.1, "image_size": 224, "batch_size": 32},
    },
    "failed": [],
}  # fmt: skip


def test_a_failed_gpu_smoke_refuses_the_image_step_until_the_probes_pass(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.smoke = {
        "models": {"vit_small_suspicious": {"error": "RuntimeError: CUDA error: no kernel image"}},
        "failed": ["vit_small_suspicious"],
    }
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert "STOPPED at step 'images'" in stopped
    assert "vit_small_suspicious: RuntimeError: CUDA error: no kernel image" in stopped
    assert "--only probe" in stopped
    assert not [c for c in fake.actions(("push",)) if c[1] in kr.IMAGE_KERNELS]
    fake.smoke = SMOKE_OK
    assert run(tmp_path, fake, weights_dir, only="probe")[0] is None
    stopped, lines = run(tmp_path, fake, weights_dir, submit=True)
    assert stopped is None, stopped
    assert state_of(tmp_path)["smoke"]["failed"] == []
    assert fake.actions(("submit",))


def test_the_run_prints_the_smoke_rates(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.smoke = SMOKE_OK
    stopped, lines = run(tmp_path, fake, weights_dir, only="probe")
    assert stopped is None
    assert any(
        "GPU smoke: vit_tiny train 812.5 img/s, infer 2410 img/s, peak 3.1 GiB" in x for x in lines
    )


@pytest.mark.slow  # trains models for minutes on 2 cores: CI, not the inner loop
def test_the_smoke_dry_path_runs_on_a_cpu_and_records_a_failure(tmp_path, monkeypatch):
    from utils.kaggle import smoke

    real = smoke.smoke_model

    def fail_convnext(name, device, steps, **overrides):
        if name == "convnextv2_nano":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(name, device, steps, **overrides)

    monkeypatch.setattr(smoke, "smoke_model", fail_convnext)
    found = json.loads(smoke.run_smoke(tmp_path, 1, ["vit_tiny", "convnextv2_nano"]).read_text())
    tiny = found["models"]["vit_tiny"]
    assert found["device"] == "cpu" and tiny["image_size"] == 32 and tiny["train_images_per_s"] > 0
    assert found["failed"] == ["convnextv2_nano"]
    assert "Traceback" in found["models"]["convnextv2_nano"]["traceback"]
    assert smoke.smoke_failures(found) == [
        "convnextv2_nano: RuntimeError: CUDA out of memory (simulated)"
    ]
