"""The dataset steps of utils.kaggle.run: create or version a dataset from the collected
outputs (or use the weights dataset made by hand), record the upload before waiting, and wait
until Kaggle reports it ready; a 403 while processing is a wait, never a second upload."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.cli import format_duration
from utils.kaggle import build as kb, limits as kl
from utils.kaggle.client import COMPLETE, KaggleClient, RunStopped
from utils.kaggle.state import digest_of, utc_now
from utils.kaggle.steps import KERNEL_STEP, POLL_FIRST_S, POLL_MAX_S, PRODUCER, Options, Step


class DatasetSteps:
    """The Runner's dataset steps (a mixin: utils.kaggle.runner.Runner holds
    the attributes below and provides say() and save())."""

    opts: Options
    plan: bool
    state: dict[str, Any]
    client: KaggleClient
    sleep: Callable[[float], None]
    clock: Callable[[], float]

    def dataset_step(self, step: Step, forced: bool) -> None:
        """Create the dataset, or version it when its content changed; wait until it is ready.
        An upload this run made and never saw ready (Kaggle answers 403 while it processes) is
        waited for, not uploaded again."""
        slug = step.dataset
        ref = f"{self.opts.owner}/{slug}"
        record = self.state["datasets"].get(slug)
        digest = digest_of(self.dataset_content(slug))
        uploads = self.state.setdefault("uploads", {})
        upload = uploads.get(slug)
        current = self.client.dataset_version(ref)
        if upload and upload["digest"] == digest and not forced:
            self.say(step.name, f"{ref}: the upload of {upload['at']} is still processing")
        elif slug == kb.WEIGHTS_DATASET and current is not None and not forced:
            if record is None or record["version"] != current:
                self.say(step.name, f"{ref} exists on Kaggle (v{current}): using it")
            else:
                self.say(step.name, f"{ref} v{current} is up to date")
            version = self.wait_dataset(step, ref)
            self.state["datasets"][slug] = {"ref": ref, "version": version, "digest": None}
            return
        elif record and current is not None and record["digest"] == digest and not forced:
            if current != record["version"]:
                self.say(
                    step.name, f"{ref}: v{record['version']} -> v{current} (changed on Kaggle)"
                )
                record["version"] = current
            self.say(step.name, f"{ref} v{current} is up to date")
            return
        else:
            self.upload(step, ref, slug, current, digest)
        version = self.wait_dataset(step, ref)
        self.state["datasets"][slug] = {"ref": ref, "version": version, "digest": digest}
        uploads.pop(slug, None)
        self.save()
        self.say(step.name, f"{ref} v{version} ready")

    def upload(self, step: Step, ref: str, slug: str, current: int | None, digest: str) -> None:
        """Create (no version yet) or version the dataset; record the upload before waiting."""
        folder = self.dataset_folder(slug)
        if current is None:
            self.client.create_dataset(folder)
            self.say(step.name, f"create {ref} from {folder}")
        else:
            self.client.version_dataset(folder, f"{self.opts.message}: new {slug} outputs")
            self.say(step.name, f"version {ref} (was v{current}) from {folder}")
        self.state.setdefault("uploads", {})[slug] = {"digest": digest, "at": utc_now()}
        self.save()

    def dataset_content(self, slug: str) -> dict[str, Any]:
        """What a dataset would hold: the output checksums of the kernels that produce it."""
        if slug == kb.WEIGHTS_DATASET:
            return {"weights": str(self.opts.weights_dir)}
        content = {}
        for name in kb.DATASET_CONTENTS[slug]:
            record = self.state["kernels"].get(PRODUCER[name])
            if record is None or record["status"] != COMPLETE or "outputs" not in record:
                step = KERNEL_STEP[PRODUCER[name]]
                raise RunStopped(f"{slug} needs {name} from {PRODUCER[name]}: run {step!r} first")
            content[name] = record["outputs"]
        return content

    def dataset_folder(self, slug: str) -> Path:
        """The upload folder (kaggle.build.build_dataset) from the collected outputs."""
        out = self.opts.work_dir / "datasets"
        if self.plan:
            if slug == kb.WEIGHTS_DATASET and not self.opts.weights_dir.is_dir():
                self.say("weights", f"  note: {self.opts.weights_dir} does not exist yet")
            return out / slug
        if slug == kb.WEIGHTS_DATASET:
            source = self.opts.weights_dir
            if not source.is_dir():
                raise RunStopped(
                    f"{kb.WEIGHTS_DATASET} is missing on Kaggle and {source} does not exist: run "
                    f"`python -m utils.kaggle.build weights --out {source}` first (needs internet)"
                )
        else:
            source = kb.fresh_dir(self.opts.work_dir / "staging" / slug)
            for name in kb.DATASET_CONTENTS[slug]:
                produced = self.opts.work_dir / "outputs" / PRODUCER[name] / name
                (source / name).symlink_to(produced.resolve(), produced.is_dir())
        return kb.build_dataset(slug, source, out, self.opts.owner)

    def wait_dataset(self, step: Step, ref: str) -> int:
        """Poll until Kaggle has processed the upload; its version number. A 403 means still
        processing; a dropped connection or a 5xx is asked again with back-off."""
        say = functools.partial(self.say, step.name)
        start, delay = self.clock(), POLL_FIRST_S
        while True:
            status = self.dataset_state(ref, say)
            version = None
            if status == "ready":  # None while it still answers 403
                get = functools.partial(self.client.dataset_version, ref)
                version = kl.retry_transient(get, f"{ref} version", self.sleep, say)
            if version is not None:
                return version
            self.say(step.name, f"  {ref}: {status} after {format_duration(self.clock() - start)}")
            if status in ("failed", "deleted"):
                self.state.get("uploads", {}).pop(kb.split_ref(ref)[1], None)
                self.save()  # the resume uploads it again
                raise RunStopped(f"Kaggle could not process {ref}: status {status}")
            if self.clock() - start >= self.opts.timeout_h * 3600:
                raise RunStopped(f"timed out waiting for {ref} to become ready ({status})")
            self.sleep(delay)
            delay = min(2 * delay, POLL_MAX_S)

    def dataset_state(self, ref: str, say: Callable[[str], None]) -> str:
        """dataset_status, 'pending (403)' while Kaggle does not show it yet."""
        get = functools.partial(self.client.dataset_status, ref)
        try:
            return kl.retry_transient(get, f"{ref} status", self.sleep, say)
        except OSError as err:
            if kl.http_status(err) == 403:
                return "pending (403)"
            raise
