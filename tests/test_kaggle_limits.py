"""Kaggle's limits in utils.kaggle.run: the GPU session cap, 403 answers, a dataset still
processing, the mount race, transient errors and the client version, each driven through the
workflow against the fake Kaggle of test_kaggle_run to a submission."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_kaggle_run as base
from test_kaggle_run import (
    OWNER,
    FakeKaggle,
    RecordingApi,
    assert_no_stale_push,
    dry_run,
    http_error,
    run,
    state_of,
)

from utils.kaggle import build as kb, limits as kl, metadata as km, run as kr, steps as kst

# the fixtures of test_kaggle_run: the kernels built once, local weights, no network
build_once, weights_dir, offline = base.build_once, base.weights_dir, base.offline


def test_the_workflow_reaches_a_submission_through_every_limit_at_once(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.gpu_cap = 2
    fake.other_gpu_sessions, fake.other_gpu_until = 1, 400.0  # a session started by hand
    fake.forbid_unready = True  # 403 for a missing dataset and for one still processing
    fake.status_403 = 2
    fake.dataset_outages = 1
    fake.mount_race.add("01_image_vit_tiny")
    fake.out_of_time["01_image_convnextv2_nano"] = [3, 4]  # Kaggle's 12 hours
    stopped, lines = run(tmp_path, fake, weights_dir, tune=True, submit=True)
    assert stopped is None, stopped
    assert fake.actions(("submit",)) == [("submit", f"{OWNER}/fusionnetx-isic2024-submission", 1)]
    assert fake.most_gpu_sessions <= 2 and fake.refusals >= 1  # refused while 2 ran
    assert any("Kaggle's GPU session cap" in line for line in lines)
    assert_no_stale_push(fake)  # nothing pushed against a dataset still processing
    creates = fake.actions(("create",))
    assert sorted(c[1] for c in creates) == sorted(kb.DATASET_CONTENTS)  # each created once
    assert fake.actions(("version",)) == []
    pushes = [c for c in fake.actions(("push",)) if c[1] == "01_image_vit_tiny"]
    assert pushes == [("push", "01_image_vit_tiny", 1), ("push", "01_image_vit_tiny", 2)]
    state = state_of(tmp_path)
    assert state["kernels"]["01_image_vit_tiny"]["mount_retry"] is True
    assert not state["uploads"]
    # GPU-hours: what the state records is what Kaggle charged, the mount race's session included
    spent = sum(state["gpu_seconds"].values())
    assert spent == pytest.approx(fake.gpu_seconds) and spent > 0
    assert state["submitted"]["status"] == "complete"
    assert state["submitted"]["public_score"] == "0.1702"
    assert any("scored: public score 0.1702" in line for line in lines)
    assert set(state["gpu_seconds"]) == {"00_probe_gpu", *kst.IMAGE_KERNELS, kb.SUBMISSION_KERNEL}


def test_gpu_kernels_are_queued_under_the_cap_and_cpu_kernels_are_not(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.gpu_cap = 1
    stopped, _ = run(tmp_path, fake, weights_dir, gpu_sessions=1)
    assert stopped is None, stopped
    assert fake.most_gpu_sessions == 1 and fake.refusals == 0
    order = [c[1] for c in fake.calls if c[0] in ("push", "output") and c[1] in kst.IMAGE_KERNELS]
    assert order == [k for kernel in kst.IMAGE_KERNELS for k in (kernel, kernel)]


def test_a_mount_race_is_pushed_again_once_then_stops(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.mount_race.add("03_gbdt")
    fake.fail_kernels.add("03_gbdt")  # the second version fails too
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "STOPPED at step 'gbdt'" in stopped and "ended with status error" in stopped
    assert [c for c in fake.actions(("push",)) if c[1] == "03_gbdt"] == [
        ("push", "03_gbdt", 1),
        ("push", "03_gbdt", 2),
    ]


def test_an_upload_still_processing_is_waited_for_not_uploaded_again(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.forbid_unready = True
    fake.processing_checks[kb.IMAGE_DATASET] = 10_000
    stopped, _ = run(tmp_path, fake, weights_dir, timeout_h=1.0)
    assert "timed out waiting for" in stopped and kb.IMAGE_DATASET in stopped
    assert state_of(tmp_path)["uploads"][kb.IMAGE_DATASET]["digest"]
    fake.processing_checks[kb.IMAGE_DATASET] = 1
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped  # FakeKaggle.create_dataset asserts no second create
    assert any("is still processing" in line for line in lines)
    assert fake.actions(("create",)).count(("create", kb.IMAGE_DATASET, 1)) == 1
    assert_no_stale_push(fake)


def test_an_existing_dataset_still_processing_is_waited_for(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.datasets[f"{OWNER}/{kb.WEIGHTS_DATASET}"] = {"version": 3, "ready": False}
    fake.processing_checks[kb.WEIGHTS_DATASET] = 3
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    assert fake.actions()[len(kst.PROBE_KERNELS)] == ("push", kst.IMAGE_KERNELS[0], 1)
    assert_no_stale_push(fake)  # the image kernels were pushed only once v3 was ready


def test_a_failed_upload_is_uploaded_again_on_resume(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.fail_datasets.add(kb.GBDT_DATASET)
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "could not process" in stopped
    fake.fail_datasets.clear()
    assert run(tmp_path, fake, weights_dir)[0] is None
    assert ("version", kb.GBDT_DATASET, 2) in fake.actions()


def test_transient_dataset_errors_are_retried_with_back_off(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.dataset_outages = 2
    stopped, lines = run(tmp_path, fake, weights_dir, only="weights")
    assert stopped is None, stopped
    assert sum("status failed (503 Server Error); retrying in" in line for line in lines) == 2
    assert fake.sleeps[:2] == [kl.TRANSIENT_FIRST_S, 2 * kl.TRANSIENT_FIRST_S]


def test_retry_transient_gives_up_and_never_retries_a_client_error():
    sleeps, said = [], []
    answers = iter([http_error(502), http_error(503), "ready"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert kl.retry_transient(flaky, "x", sleeps.append, said.append) == "ready"
    assert sleeps == [15.0, 30.0] and len(said) == 2

    def forbidden():
        raise http_error(401)

    with pytest.raises(OSError, match="401"):
        kl.retry_transient(forbidden, "x", sleeps.append, said.append)
    assert len(sleeps) == 2

    def down():
        raise ConnectionError("dropped")

    with pytest.raises(ConnectionError):
        kl.retry_transient(down, "x", sleeps.append, said.append, retries=2)
    assert sleeps[2:] == [15.0, 30.0]


def test_the_adapter_reads_a_cap_refusal_and_a_403(tmp_path):
    api = RecordingApi()
    api.answer_kernels_push = lambda folder, **kw: type(
        "R", (), {"error": "Maximum number of concurrent GPU sessions reached"}
    )()

    def forbidden(dataset, format=None):
        raise http_error(403)

    api.answer_dataset_status = forbidden
    client = kr.KaggleApiClient(api)
    with pytest.raises(kl.SessionCapReached, match="concurrent GPU sessions"):
        client.push_kernel(tmp_path)
    assert client.dataset_version(f"{OWNER}/{kb.WEIGHTS_DATASET}") is None
    with pytest.raises(OSError, match="403"):
        client.dataset_status(f"{OWNER}/{kb.WEIGHTS_DATASET}")


@pytest.mark.parametrize("old", ["1.6.17", "1.7.4.5", "2.2.4", None])
def test_an_old_kaggle_client_is_refused_naming_the_version_needed(old, monkeypatch, capsys):
    if old is None:
        with pytest.raises(kl.ClientVersionError, match="the kaggle client is missing"):
            kl.check_client_version("")
        return
    with pytest.raises(kl.ClientVersionError, match=r"kaggle 1\.|kaggle 2\.2\.4") as err:
        kl.check_client_version(old)
    assert "needs kaggle>=2.2.5" in str(err.value)
    monkeypatch.setattr(kl.metadata, "version", lambda name: old)
    assert kr.main(["--owner", OWNER, "--work-dir", "unused"]) == 1
    assert f"kaggle {old} is installed; utils.kaggle.run needs kaggle>=2.2.5" in (
        capsys.readouterr().err
    )


def test_the_installed_client_is_new_enough():
    assert kl.release(kl.check_client_version()) >= (2, 2, 5)


def test_the_plan_shows_the_queue_under_the_cap(offline, tmp_path):
    code, lines = dry_run(["--owner", "alice", "--work-dir", str(tmp_path / "work")])
    assert code == 0
    queued = [line for line in lines if " queue " in f" {line}"]
    assert [line.split()[2] for line in queued] == [
        "01_image_vit_tiny_suspicious:",
        "01_image_vit_small_suspicious:",
    ]
    assert "pushed when 01_image_convnextv2_nano ends" in queued[0]
    text = "\n".join(lines)
    assert text.index("push alice/fusionnetx-isic2024-probe-gpu") < text.index("projected GPU")
    assert "compare both images with requirements-kaggle.txt" in text
    assert text.index("then DDP on every GPU") < text.index("projected GPU-hours")
    assert "total 1.86 h (x2 for the projection's error: 3.72 h)" in text
    assert text.index("projected GPU-hours") < text.index("push alice/fusionnetx-isic2024-vit")
    assert "polls the submission until Kaggle scores it" in lines[-2]
    code, lines = dry_run(["--owner", "alice", "--submit", "--work-dir", str(tmp_path / "w")])
    assert "then poll it until scored" in "\n".join(lines)
    code, lines = dry_run(["--owner", "alice", "--gpu-sessions", "4", "--work-dir", str(tmp_path)])
    assert not any(" queue " in f" {line}" for line in lines)


def test_a_submission_that_fails_scoring_stops_with_kaggles_error(tmp_path, weights_dir):
    fake = FakeKaggle()
    fake.fail_scoring = True
    stopped, lines = run(tmp_path, fake, weights_dir, submit=True)
    assert "Kaggle could not score the submission: Submission Scoring Error" in stopped
    assert any("failed: Submission Scoring Error: see the kernel log" in line for line in lines)
    done = state_of(tmp_path)["submitted"]
    assert done["status"] == "error" and done["submission_ref"] == 900
    polls = fake.submissions[0]["polls"]
    stopped, lines = run(tmp_path, fake, weights_dir, submit=True)
    assert stopped is None and fake.submissions[0]["polls"] == polls  # recorded, not polled
    assert any("failed: Submission Scoring Error" in line for line in lines)
    assert fake.actions(("submit",)) == [("submit", f"{OWNER}/fusionnetx-isic2024-submission", 1)]


def test_follow_submission_backs_off_and_returns_a_pending_one_at_the_timeout():
    from utils.kaggle import submission as sub

    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    pending = {"ref": 1, "status": "pending", "description": "FusionNetX v3"}
    found = sub.follow_submission(lambda: pending, "FusionNetX v3", sleep, lambda: now[0],
                                  lambda _: None, timeout_s=3600)  # fmt: skip
    assert found["status"] == "pending" and sub.outcome(found).startswith("still pending")
    assert sleeps[:4] == [60.0, 120.0, 240.0, 480.0] and max(sleeps) == sub.POLL_MAX_S
    with pytest.raises(sub.SubmissionNotFound, match="'FusionNetX v2', not 'FusionNetX v3'"):
        sub.follow_submission(lambda: {**pending, "description": "FusionNetX v2"},
                              "FusionNetX v3", sleep, lambda: now[0], print, 1)  # fmt: skip


def test_an_image_session_out_of_time_is_continued_not_pushed_again(tmp_path, weights_dir):
    fake = FakeKaggle()
    kernel = "01_image_vit_small_suspicious"
    fake.out_of_time[kernel] = [2, 3, 4]
    stopped, lines = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    pushes = [c for c in fake.actions(("push",)) if c[1] == kernel]
    assert pushes == [("push", kernel, 1), ("push", kernel, 2)]
    slug = "fusionnetx-isic2024-vit-small-suspicious"
    first, second = (fake.pushed_meta[(f"{OWNER}/{slug}", v)] for v in (1, 2))
    assert not first.get("kernel_sources") and second["kernel_sources"] == [f"{OWNER}/{slug}"]
    notebook = json.loads((Path(second["folder"]) / f"{kernel}.ipynb").read_text())
    injected = next(
        "".join(c["source"])
        for c in notebook["cells"]
        if km.INJECTED_TAG in c["metadata"].get("tags", [])
    )
    assert "folds = [2, 3, 4]" in injected and "resume_from = str(input_path(" in injected
    assert any("ran out of its time budget; continue folds [2, 3, 4] of v1" in x for x in lines)
    record = state_of(tmp_path)["kernels"][kernel]
    assert record["version"] == 2 and record["status"] == "complete"
    # the image dataset was made from the finished run: the second session's oof.csv
    oof = tmp_path / "work/datasets" / kb.IMAGE_DATASET / "vit_small_suspicious/oof.csv"
    assert oof.read_text() == f"{OWNER}/{slug} v2 vit_small_suspicious/oof.csv"


def test_a_partial_session_recorded_before_a_stop_is_continued_on_resume(tmp_path, weights_dir):
    fake = FakeKaggle()
    kernel = kst.IMAGE_KERNELS[0]
    fake.out_of_time[kernel] = [4]
    fake.fail_kernels.add(kst.IMAGE_KERNELS[1])  # stops the run before the continuation ends
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert "STOPPED at step 'images'" in stopped
    assert state_of(tmp_path)["kernels"][kernel]["status"] == "partial"
    fake.fail_kernels.clear()
    assert run(tmp_path, fake, weights_dir)[0] is None
    assert [c for c in fake.actions(("push",)) if c[1] == kernel][-1] == ("push", kernel, 2)
    assert state_of(tmp_path)["kernels"][kernel]["status"] == "complete"


def test_the_image_step_prints_projected_gpu_hours_and_refuses_beyond_the_quota(
    tmp_path, weights_dir
):
    from utils.kaggle import quota

    fake = FakeKaggle()
    stopped, lines = run(tmp_path, fake, weights_dir, gpu_hours=3.0)
    assert "STOPPED at step 'images'" in stopped and "raise --gpu-hours" in stopped
    expected = quota.QUOTA_SAFETY * sum(quota.PROJECTED_HOURS.values())
    assert f"projected at up to {expected:.2f} GPU-hours" in stopped
    assert any("FLOP projection" in line and "not measured" in line for line in lines)
    assert not [c for c in fake.actions(("push",)) if c[1] in kst.IMAGE_KERNELS]
    stopped, lines = run(tmp_path, fake, weights_dir, gpu_hours=30.0)
    assert stopped is None, stopped
    spent = sum(state_of(tmp_path)["gpu_seconds"].values()) / 3600
    assert spent == pytest.approx(fake.gpu_seconds / 3600) and spent > 0
    # spent hours count against the quota on the next run
    lines_again, refusal = quota.quota_lines(list(quota.PROJECTED_HOURS), state_of(tmp_path), spent)
    assert refusal is not None and f"spent so far {spent:.2f} h" in lines_again[-1]


def test_a_mount_race_in_a_continuation_pushes_the_continuation_again(tmp_path, weights_dir):
    fake = FakeKaggle()
    kernel = "01_image_vit_tiny"
    fake.out_of_time[kernel] = [3, 4]  # v1 ends with folds left
    fake.mount_race.add(kernel)
    fake.mount_race_version = 2  # the continuation starts before its input is mounted
    stopped, _ = run(tmp_path, fake, weights_dir)
    assert stopped is None, stopped
    slug = f"{OWNER}/fusionnetx-isic2024-vit-tiny"
    sources = [fake.pushed_meta[(slug, v)].get("kernel_sources") for v in (1, 2, 3)]
    assert sources == [[], [slug], [slug]]  # v3 is the continuation again, not a fresh run
    assert "/continue/" in state_of(tmp_path)["kernels"][kernel]["folder"]
