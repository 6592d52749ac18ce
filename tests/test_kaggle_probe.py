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

from utils.kaggle import build as kb, input as ki, probe, steps as kst

REPO = Path(__file__).resolve().parents[1]
PINS = probe.requirement_pins((REPO / "requirements-kaggle.txt").read_text())
build_once, weights_dir = base.build_once, base.weights_dir
FIXTURES = REPO / "tests" / "fixtures"  # real competition rows (tests/fixtures/LICENSE.md)


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
    assert [c[1] for c in fake.actions()] == list(kst.PROBE_KERNELS)


def test_probe_kernels_are_built_never_to_stop_on_a_version(tmp_path):
    built = kb.build_all(tmp_path / "b", "alice")
    for kernel in kst.PROBE_KERNELS:
        folder = next(p for p in built if p.name == kernel)
        meta = kb.read_json(folder / kb.KERNEL_METADATA)
        assert meta["enable_internet"] is False and meta["dataset_sources"] == []
        assert meta["enable_gpu"] is (kernel == "00_probe_gpu")
        source = json.loads((folder / meta["code_file"]).read_text())["cells"][0]["source"]
        assert "stop=False" in "".join(source)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", kst.PROBE_KERNELS)
def test_built_probe_kernel_runs_off_the_repo_against_an_emulated_input(tmp_path, kernel):
    inputs = tmp_path / "input"
    comp = inputs / kb.COMPETITION
    comp.mkdir(parents=True)
    (comp / "test-metadata.csv").write_text("isic_id\n")
    shutil.copy(FIXTURES / "train-image-sample5.hdf5", comp / "train-image.hdf5")
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
    found = json.loads((elsewhere / kst.PRODUCES[kernel]).read_text())
    assert found["image"] == kernel.rsplit("_", 1)[1]
    listed = found["inputs"][kb.COMPETITION + "/"]
    assert listed["test-metadata.csv"] == 8 and "train-image.hdf5" in listed
    if kernel == "00_probe_gpu":  # training input and submission pass on the mounted real crops
        smoked = json.loads((elsewhere / "smoke-gpu.json").read_text())
        for part in ("train_loader", "image_pass"):
            assert smoked[part]["rows"] == 5 and smoked[part]["failed"] == [], part
        assert all(r["unreadable"] == 0 for r in smoked["image_pass"]["models"].values())


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
    assert not [c for c in fake.actions(("push",)) if c[1] in kst.IMAGE_KERNELS]
    # GPU-hours: only the GPU probe's session was spent, and the state records what it cost
    assert list(state_of(tmp_path)["gpu_seconds"]) == ["00_probe_gpu"]
    assert state_of(tmp_path)["gpu_seconds"]["00_probe_gpu"] == pytest.approx(fake.gpu_seconds)
    fake.smoke = SMOKE_OK
    assert run(tmp_path, fake, weights_dir, only="probe")[0] is None
    stopped, lines = run(tmp_path, fake, weights_dir, submit=True)
    assert stopped is None, stopped
    state = state_of(tmp_path)
    assert state["smoke"]["failed"] == []
    assert fake.actions(("submit",)) and state["submitted"]["status"] == "complete"
    spent = state["gpu_seconds"]
    assert set(spent) == {"00_probe_gpu", *kst.IMAGE_KERNELS, kb.SUBMISSION_KERNEL}
    assert sum(spent.values()) == pytest.approx(fake.gpu_seconds)  # both probe runs included


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


@pytest.mark.slow  # spawns two gloo ranks per model: CI, not the inner loop
def test_the_smoke_runs_ddp_on_gloo_ranks_and_records_a_rank_failure(tmp_path):
    from utils.kaggle import smoke

    found = json.loads(
        smoke.run_smoke(tmp_path, 1, ["vit_tiny", "no_such_model"], ddp_processes=2).read_text()
    )
    ddp = found["ddp"]
    assert (ddp["world_size"], ddp["device"], ddp["backend"]) == (2, "cpu", "gloo")
    tiny = ddp["models"]["vit_tiny"]
    assert tiny["batch_size"] == 4 and tiny["image_size"] == 32  # the global batch, 2 per rank
    assert tiny["train_images_per_s"] > 0 and tiny["infer_images_per_s"] > 0
    assert ddp["failed"] == ["no_such_model"]
    failure = ddp["models"]["no_such_model"]
    assert failure["error"].startswith("RankFailed: rank ")
    assert "unknown image model 'no_such_model'" in failure["error"]
    assert "Traceback" in failure["traceback"] and "image_config" in failure["traceback"]
    lines = smoke.smoke_failures(found)
    assert lines[0].startswith("no_such_model: KeyError")  # the one-process pass failed too
    assert lines[1].startswith("no_such_model (DDP on 2 ranks): RankFailed: rank ")
    assert "| DDP x2 (gloo): vit_tiny train " in smoke.smoke_summary(found)


SMOKE_T4X2 = {
    "device": "cuda:0",
    "gpus": 1,
    "models": {model: {"train_images_per_s": 100.0, "infer_images_per_s": 1000.0}
               for model in base.IMAGE_MODELS},
    "failed": [],
    "ddp": {
        "world_size": 2, "device": "cuda", "backend": "nccl", "failed": ["vit_small_suspicious"],
        "models": {
            "vit_tiny": {"train_images_per_s": 200.0, "infer_images_per_s": 2000.0},
            "vit_small_suspicious": {"error": "RankFailed: rank 1 of 2 failed: ... NCCL error"},
        },
    },
}  # fmt: skip


def test_the_quota_projects_from_the_smokes_rates_and_labels_each_source():
    from utils.kaggle import quota

    hours, sources = quota.projection(
        ["01_image_vit_tiny", "01_image_vit_small_suspicious", "04_inference"], SMOKE_T4X2
    )
    # vit_tiny, full: 5 folds x 30 epochs; 393 positives, 4/5 of them shown twice plus as many
    # negatives (1,257.6 images an epoch); validation 393/5 x 11 an epoch; the OOF 401,059/5
    train, predicted = 30 * 1257.6, 30 * 393 / 5 * 11 + 401_059 / 5
    assert hours["01_image_vit_tiny"] == pytest.approx(5 * (train / 200 + predicted / 2000) / 3600)
    assert sources["01_image_vit_tiny"] == "measured by the smoke kernel, DDP on 2 GPUs"
    # DDP failed for vit_small: its one-GPU rates stand in
    assert sources["01_image_vit_small_suspicious"] == "measured by the smoke kernel, one GPU"
    # the submission: 500,000 test images x 5 folds through each of the four models
    per_model = {m: 1000.0 for m in base.IMAGE_MODELS} | {"vit_tiny": 2000.0}
    expected = sum(2_500_000 / rate for rate in per_model.values()) / 3600
    assert hours["04_inference"] == pytest.approx(expected)
    cpu_smoke = {**SMOKE_T4X2, "gpus": 0, "ddp": {**SMOKE_T4X2["ddp"], "device": "cpu"}}
    _, sources = quota.projection(["01_image_vit_tiny"], cpu_smoke)  # a CPU measures no GPU
    assert sources == {"01_image_vit_tiny": quota.SOURCE}


def test_the_submission_is_projected_from_the_timed_image_pass_where_it_ran():
    from utils.kaggle import quota

    passes = {m: {"rows": 4000, "devices": 2, "fold_models": 5, "images_per_s": 500.0}
              for m in base.IMAGE_MODELS}  # fmt: skip
    smoke = {**SMOKE_T4X2, "image_pass": {"rows": 4000, "models": passes, "failed": []}}
    hours, sources = quota.projection(["04_inference"], smoke)
    # 500,000 hidden test images through each model's pass (its 5 folds included in the rate)
    assert hours["04_inference"] == pytest.approx(len(passes) * 500_000 / 500.0 / 3600)
    assert sources["04_inference"] == (
        "measured by the smoke kernel, the submission's image pass on 2 GPU(s), decode included"
    )
    # one model's pass failed: the inference steps' rates stand in, as without the pass
    failed = {**passes, "vit_tiny": {"error": "RuntimeError: boom"}}
    smoke["image_pass"] = {"rows": 4000, "models": failed, "failed": ["vit_tiny"]}
    _, sources = quota.projection(["04_inference"], smoke)
    assert "image pass" not in sources["04_inference"]
    from utils.kaggle.smoke import smoke_failures

    assert "vit_tiny (submission image pass): RuntimeError: boom" in smoke_failures(smoke)


def test_real_crops_time_the_training_input_and_the_submission_pass(tmp_path, capsys):
    from utils.kaggle import smoke

    real = FIXTURES / "train-image-sample5.hdf5"
    tiny = {"image_size": 32, "batch_size": 2, "num_workers": 0}
    found = smoke.real_crops(real, ["vit_tiny", "no_such_model"], 3, tiny)
    loader, passed = found["train_loader"], found["image_pass"]
    # the training input: the training augmentation on the 3 decoded crops, in batches of 2
    assert loader["rows"] == 3 and loader["models"]["vit_tiny"]["rows"] == 3
    assert loader["models"]["vit_tiny"]["loader_images_per_s"] > 0
    # the submission pass: every fold model over the same crops, none unreadable
    model = passed["models"]["vit_tiny"]
    assert (passed["rows"], model["rows"], model["devices"]) == (3, 3, 1)
    assert model["fold_models"] == 5 and model["unreadable"] == 0 and model["images_per_s"] > 0
    assert loader["failed"] == passed["failed"] == ["no_such_model"]
    summary = smoke.smoke_summary({"models": {}, **found})
    assert "training input on 3 real crops: vit_tiny " in summary
    assert "submission image pass on 3 real crops: vit_tiny " in summary
    assert "no_such_model FAILED" in summary
    failures = smoke.smoke_failures({"models": {}, "failed": [], **found})
    assert [line.split(":")[0] for line in failures] == [
        "no_such_model (training input)",
        "no_such_model (submission image pass)",
    ]


def test_a_slow_training_input_caps_the_projected_training_rate():
    from utils.kaggle import quota

    gpu_only = quota.projection(["01_image_vit_tiny"], SMOKE_T4X2)[0]["01_image_vit_tiny"]
    loader = {"rows": 4000, "models": {"vit_tiny": {"loader_images_per_s": 100.0}}}
    hours, sources = quota.projection(["01_image_vit_tiny"], {**SMOKE_T4X2, "train_loader": loader})
    # vit_tiny's GPU trains 200 img/s under DDP; its loader feeds 100: the training part doubles
    train, predicted = 30 * 1257.6, 30 * 393 / 5 * 11 + 401_059 / 5
    assert hours["01_image_vit_tiny"] == pytest.approx(5 * (train / 100 + predicted / 2000) / 3600)
    assert hours["01_image_vit_tiny"] > gpu_only
    assert sources["01_image_vit_tiny"] == (
        "measured by the smoke kernel, DDP on 2 GPUs, training input on real crops"
    )
    fast = {"rows": 4000, "models": {"vit_tiny": {"loader_images_per_s": 5000.0}}}
    hours, _ = quota.projection(["01_image_vit_tiny"], {**SMOKE_T4X2, "train_loader": fast})
    assert hours["01_image_vit_tiny"] == pytest.approx(gpu_only)  # the GPU is the limit


def test_the_run_checks_the_quota_at_the_smokes_rates(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.smoke = {**SMOKE_T4X2, "ddp": {**SMOKE_T4X2["ddp"], "failed": [], "models": {}}}
    fake.smoke["models"] = {m: {"train_images_per_s": 2.0, "infer_images_per_s": 20.0}
                            for m in base.IMAGE_MODELS}  # fmt: skip
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert "STOPPED at step 'images'" in stopped and "raise --gpu-hours" in stopped
    assert any("projected GPU-hours, measured by the smoke kernel, one GPU:" in x for x in lines)
    assert not any("FLOP projection" in line for line in lines)
    assert not [c for c in fake.actions(("push",)) if c[1] in kst.IMAGE_KERNELS]
    fake.smoke = SMOKE_T4X2  # fast enough, but DDP failed for one model: refused
    assert run(tmp_path, fake, weights_dir, only="probe")[0] is None
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "vit_small_suspicious (DDP on 2 GPUs): RankFailed: rank 1 of 2" in stopped
    ddp = {**SMOKE_T4X2["ddp"], "failed": []}
    ddp["models"] = {"vit_tiny": ddp["models"]["vit_tiny"]}
    fake.smoke = {**SMOKE_T4X2, "ddp": ddp}
    assert run(tmp_path, fake, weights_dir, only="probe")[0] is None
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    measured = "01_image_vit_tiny: 0.34 h (measured by the smoke kernel, DDP on 2 GPUs)"
    assert any(line.startswith("images") and line.endswith(measured) for line in lines)


PROBE_FIXTURE = {
    "image": "gpu",
    "python": "3.12.3",
    "libraries": {**PINS, "torch": "2.11.0+cu128", "optuna": "4.5.0", "timm": "0.6.13",
                  "opencv": "4.12.0.88", "catboost": None},
}  # fmt: skip


@pytest.fixture
def pinned_copies(tmp_path) -> tuple[Path, Path]:
    """Copies of requirements-kaggle.txt and utils/kaggle/input.py to write pins into."""
    requirements, module = tmp_path / "requirements-kaggle.txt", tmp_path / "input.py"
    shutil.copy(REPO / "requirements-kaggle.txt", requirements)
    shutil.copy(REPO / "utils" / "kaggle" / "input.py", module)
    return requirements, module


def test_pins_print_and_write_the_probes_versions(tmp_path, pinned_copies, capsys):
    from utils.kaggle import pins

    requirements, module = pinned_copies
    before = requirements.read_text()
    probe_json = tmp_path / "probe-gpu.json"
    probe_json.write_text(json.dumps(PROBE_FIXTURE))
    argv = [str(probe_json), "--requirements", str(requirements), "--input-module", str(module)]
    assert pins.main(argv) == 0
    out = capsys.readouterr().out
    assert "  torch: 2.10.0 -> 2.11.0" in out and "  optuna: 5.0.0 -> 4.5.0" in out
    assert "timm==1.0.26 kept: the gpu image's 0.6.13 is known not to work" in out
    assert "catboost==1.2.10 kept: not installed in the gpu image" in out
    assert requirements.read_text() == before  # printed only

    assert pins.main([*argv, "--write"]) == 0
    after = requirements.read_text()
    changed = [
        (old, new)
        for old, new in zip(before.splitlines(), after.splitlines(), strict=True)
        if old != new
    ]
    assert changed == [
        ("torch==2.10.0", "torch==2.11.0"),  # no local +cu128: the index's version
        ("opencv-python-headless==4.13.0.92", "opencv-python-headless==4.12.0.88"),
        ("optuna==5.0.0", "optuna==4.5.0"),
    ]  # every comment and other pin as it was; timm not loosened to a known-bad version
    source = module.read_text()
    assert (
        '"torch": (("torch",), "2.11.0"),' in source and '"timm": (("timm",), "1.0.26"),' in source
    )
    namespace: dict = {}
    exec(compile(source, str(module), "exec"), namespace)  # still a valid module
    written = probe.requirement_pins(after)
    assert {lib: v for lib, (_, v) in namespace["MIN_VERSIONS"].items()} == written
    assert pins.main([*argv, "--write"]) == 0 and requirements.read_text() == after  # idempotent


def test_pins_write_only_the_gpu_images_probe(tmp_path, pinned_copies, capsys):
    from utils.kaggle import pins

    requirements, module = pinned_copies
    before = requirements.read_text()
    probe_json = tmp_path / "probe-cpu.json"
    probe_json.write_text(json.dumps({**PROBE_FIXTURE, "image": "cpu"}))
    argv = [str(probe_json), "--write", "--requirements", str(requirements)]
    assert pins.main([*argv, "--input-module", str(module)]) == 1
    assert "pins Kaggle's gpu image, so nothing is written" in capsys.readouterr().err
    assert requirements.read_text() == before
    assert pins.main([str(tmp_path / "missing.json")]) == 1
    assert "cannot read the probe" in capsys.readouterr().err


def test_the_probe_step_names_the_pins_command(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.probes["00_probe_gpu"] = _probe("gpu", optuna="4.5.0")
    stopped, lines = run(tmp_path, fake, weights_dir, only="probe")
    assert stopped is None, stopped
    path = tmp_path / "work" / "outputs" / "00_probe_gpu" / "probe-gpu.json"
    assert f"probe           to pin what it has: python -m utils.kaggle.pins {path}" in lines
