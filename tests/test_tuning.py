"""Stage 2: Optuna studies of the GBDT kinds, best_params.json for 03_gbdt, the notebook."""

import dataclasses
import functools
import json
from pathlib import Path

import matplotlib
import numpy as np
import optuna
import polars as pl
import pytest
from notebook_checks import assert_thin_and_clean, run_notebook
from optuna.trial import TrialState

from utils.layout import BEST_PARAMS_FILE, STORAGE_FILE, TUNING_DIR
from utils.manifest import verify_manifest
from utils.pipeline import make_run
from utils.pipeline_stages import STAGES
from utils.settings import DEMO_FOLDS, PAPER_GBDT_PARAMS, PRESETS, resolve
from utils.tabular.cv import cross_validate
from utils.tabular.gbdt import load_training_frame, training_rows
from utils.tabular.libraries import META_MEMBER, load_params, make_members, resolve_params
from utils.tabular.tuning import (
    DEFAULT_ATTR,
    SEARCH_SPACES,
    centre_params,
    default_trial_params,
    objective,
    open_study,
    param_importances,
    plot_history,
    plot_importances,
    run_tuning,
    setup_of,
    storage_url,
    study_name,
    summary_table,
    tune,
    tuned_studies,
    write_best_params,
)

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "02_tune_gbdt.ipynb"
PARAMETERS = {
    "data_dir",
    "output_dir",
    "preset",
    "recipe",
    "image_oof_dirs",
    "n_trials",
    "timeout",
    "kinds",
    "seed",
    "threads",
}
DEMO_GBDT = resolve("demo").gbdt


def tune_cfg(preset="demo", **overrides):
    """The tuning settings of `preset` with `overrides` (utils.settings)."""
    return resolve(preset, tuning=overrides).tuning


@pytest.fixture(scope="module")
def data(synthetic_dir):
    return load_training_frame(synthetic_dir)


@pytest.mark.parametrize("kind", sorted(SEARCH_SPACES))
def test_search_space_is_centred_on_published_params(kind):
    centre = centre_params(kind, tune_cfg("full"))
    default = default_trial_params(kind, tune_cfg("full"))
    assert default == {name: PAPER_GBDT_PARAMS[kind][name] for name in default}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    SEARCH_SPACES[kind](trial, centre)
    assert set(trial.distributions) == set(default)
    for name, dist in trial.distributions.items():
        assert dist.low < centre[name] < dist.high
    assert {"learning_rate", "scale_pos_weight"} <= set(default)
    assert {"n_estimators", "iterations"} & set(default)


def test_demo_preset_lowers_rounds_only_in_the_centre():
    demo = tune_cfg("demo")
    assert default_trial_params("cat", demo)["iterations"] < PAPER_GBDT_PARAMS["cat"]["iterations"]
    assert (
        default_trial_params("lgb", demo)["learning_rate"]
        == PAPER_GBDT_PARAMS["lgb"]["learning_rate"]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ["lgbm"]}, r"unknown GBDT kind\(s\) \['lgbm'\]; choose from \['cat', 'lgb'"),
        ({"kinds": []}, "non-empty list"),
        ({"kinds": "[]"}, "non-empty list"),  # a papermill string holding an empty list
        ({"kinds": ["lgb", "lgb"]}, "twice"),
        ({"n_trials": 0}, "n_trials must be a positive integer"),
        ({"timeout": 0}, "timeout must be positive"),
    ],
)
def test_tuning_settings_reject_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tune_cfg(**kwargs)


def test_n_trials_defaults_to_the_preset():
    assert tune_cfg("demo").n_trials == 3
    assert tune_cfg("full", kinds=["xgb"], timeout=5).n_trials == 50


def test_study_writes_params_stage3_uses_and_resumes(data, tmp_path):
    config = tune_cfg(kinds=["lgb"], n_trials=3, threads=1)
    study = tune(data, config, tmp_path)["lgb"]
    assert (tmp_path / TUNING_DIR / STORAGE_FILE).is_file()
    assert len(study.trials) == 3
    assert study.trials[0].params == default_trial_params("lgb", config)
    assert study.trials[0].user_attrs[DEFAULT_ATTR]
    for trial in study.trials:
        folds = trial.user_attrs["fold_pauc"]
        assert sorted(trial.intermediate_values) == [0, 1, 2, 3, 4]
        assert trial.intermediate_values[4] == pytest.approx(np.nanmean(folds))

    path = write_best_params(tuned_studies(data, config, tmp_path), tmp_path)
    assert path == tmp_path / TUNING_DIR / BEST_PARAMS_FILE
    params = resolve_params(DEMO_GBDT, load_params(path))
    assert set(load_params(path)) == {"lgb"}
    members = make_members(data.meta_features, data.image_columns, params)
    for name in ("lgb", META_MEMBER):
        assert study.best_params.items() <= members[name].params.items()
    assert members["cat"].params == resolve_params(DEMO_GBDT)["cat"]
    # the objective is stage 3's overall OOF pAUC of that member
    cv = cross_validate(data.frame, data.y, data.folds, {"lgb": members["lgb"]}, threads=1)
    assert cv.overall_scores()["lgb"] == pytest.approx(study.best_value, abs=1e-12)

    first_params = [t.params for t in study.trials]
    again = tune(data, dataclasses.replace(config, n_trials=2), tmp_path)["lgb"]
    assert again.study_name == study.study_name
    assert [t.number for t in again.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in again.trials[:3]] == first_params
    assert all(t.params not in first_params for t in again.trials[3:])
    assert sum(DEFAULT_ATTR in t.user_attrs for t in again.trials) == 1
    # best_params.json now holds the best of all five trials, old and new
    values = [t.value for t in again.trials]
    best = again.trials[int(np.argmax(values))].params
    path = write_best_params(tuned_studies(data, config, tmp_path), tmp_path)
    assert load_params(path)["lgb"] == best
    assert optuna.get_all_study_names(f"sqlite:///{tmp_path / TUNING_DIR / STORAGE_FILE}") == [
        study.study_name
    ]


def test_trials_train_on_the_rows_stage3_trains_on_with_filter_training(data, monkeypatch):
    """A recipe whose stage 3 trains without the reference's filtered rows
    (GBDTConfig.filter_training): a trial's fold models leave the same rows out, so its value
    is stage 3's cross-validation with those rows out of training, not the one on every row;
    the setup records the training rows, so such trials get a study of their own."""
    assert data.filtered is not None and data.filtered.any()
    config = tune_cfg(kinds=["lgb"], n_trials=1, threads=1)
    every_row = setup_of(data, config)
    demo = PRESETS["demo"]

    def filtering(recipe: str):
        settings = demo(recipe)
        return dataclasses.replace(
            settings, gbdt=dataclasses.replace(settings.gbdt, filter_training=True)
        )

    monkeypatch.setitem(PRESETS, "demo", filtering)
    gbdt = resolve("demo").gbdt
    study = optuna.create_study(direction="maximize")
    study.optimize(functools.partial(objective, kind="lgb", data=data, config=config), n_trials=1)
    params = resolve_params(gbdt, {"lgb": study.trials[0].params})
    member = make_members(data.meta_features, data.image_features, params, names=["lgb"])

    def stage3(trainable):
        cv = cross_validate(
            data.frame, data.y, data.folds, member, config.model_seeds, gbdt.sampling, 1,
            trainable=trainable,
        )  # fmt: skip
        return cv.overall_scores()["lgb"]

    rows = training_rows(gbdt, data)
    np.testing.assert_array_equal(rows, ~data.filtered)
    assert study.trials[0].value == pytest.approx(stage3(rows), abs=1e-12)
    assert study.trials[0].value != pytest.approx(stage3(None), abs=1e-6)
    setup = setup_of(data, config)
    assert setup["training_rows"] == int(rows.sum()) < data.y.size
    assert "training_rows" not in every_row
    assert study_name("lgb", setup) != study_name("lgb", every_row)


def test_run_killed_during_default_trial_queues_it_again(data, tmp_path):
    config = tune_cfg(kinds=["lgb"], n_trials=1, threads=1)
    open_study("lgb", data, config, storage_url(tmp_path)).ask()  # killed in trial 0
    study = tune(data, config, tmp_path)["lgb"]
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.COMPLETE]
    assert study.trials[1].params == default_trial_params("lgb", config)
    assert summary_table({"lgb": study})["default_pauc"][0] == study.trials[1].value


class _PruneAtOnce(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trial_stops_after_the_first_fold(data):
    config = tune_cfg(kinds=["lgb"], n_trials=1, threads=1)
    study = optuna.create_study(direction="maximize", pruner=_PruneAtOnce())
    study.optimize(functools.partial(objective, kind="lgb", data=data, config=config), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED
    assert list(trial.intermediate_values) == [0]
    assert len(trial.user_attrs["fold_pauc"]) == 1


def test_same_seed_gives_same_trials(data, tmp_path):
    config = tune_cfg(kinds=["lgb"], n_trials=2, threads=1)
    runs = [tune(data, config, tmp_path / name)["lgb"] for name in ("a", "b")]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]
    assert [t.value for t in runs[0].trials] == [t.value for t in runs[1].trials]


def test_new_data_preset_or_seed_gets_a_new_study(data):
    config = tune_cfg()
    name = study_name("cat", setup_of(data, config))
    assert name.startswith("cat-demo-")
    assert study_name("cat", setup_of(data, config)) == name
    with_image = dataclasses.replace(
        data,
        frame=data.frame.with_columns(img_vit_tiny=pl.lit(0.5, pl.Float32)),
        image_sources={"img_vit_tiny": {"image_model": "vit_tiny", "config_hash": "x"}},
    )
    retrained = dataclasses.replace(
        with_image, frame=data.frame.with_columns(img_vit_tiny=pl.lit(0.25, pl.Float32))
    )
    names = {
        name,
        study_name("cat", setup_of(with_image, config)),
        study_name("cat", setup_of(retrained, config)),
        study_name("cat", setup_of(data, tune_cfg("full"))),
        study_name("cat", setup_of(data, tune_cfg(seed=4))),
    }
    assert len(names) == 5


def test_run_tuning_resumes_the_same_setup_and_starts_clean_on_another(synthetic_dir, tmp_path):
    """Same settings: trials are added (an interrupted run resumes); another seed or `force`:
    the old tuning folder is moved aside and the new studies start from trial 0."""
    settings = {"kinds": ["lgb"], "n_trials": 1, "threads": 1}
    first = run_tuning(synthetic_dir, tmp_path, **settings)
    assert len(first.studies["lgb"].trials) == 1 and verify_manifest(first.out_dir) == []
    again = run_tuning(synthetic_dir, tmp_path, **settings)
    assert len(again.studies["lgb"].trials) == 2
    assert not (tmp_path / ".previous").exists()
    reseeded = run_tuning(synthetic_dir, tmp_path, **{**settings, "seed": 4})
    assert len(reseeded.studies["lgb"].trials) == 1
    assert (tmp_path / ".previous" / TUNING_DIR / STORAGE_FILE).is_file()
    names = optuna.get_all_study_names(storage_url(tmp_path))
    assert names == [reseeded.studies["lgb"].study_name]  # the old study is not in the folder
    forced = run_tuning(synthetic_dir, tmp_path, force=True, **{**settings, "seed": 4})
    assert len(forced.studies["lgb"].trials) == 1 and verify_manifest(forced.out_dir) == []


def _study_with_values(values: list[float]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dists = {"learning_rate": optuna.distributions.FloatDistribution(0.01, 0.1, log=True)}
    for i, value in enumerate(values):
        params = {"learning_rate": 0.01 + 0.02 * i}
        user_attrs = {DEFAULT_ATTR: True} if i == 0 else {}
        trial = optuna.trial.create_trial(
            params=params, distributions=dists, value=value, user_attrs=user_attrs
        )
        study.add_trial(trial)
    return study


def test_importances_summary_and_plots_handle_few_trials():
    one, three = _study_with_values([0.1]), _study_with_values([0.1, 0.12, 0.11])
    assert param_importances(one) == {}
    assert param_importances(_study_with_values([0.1, 0.1])) == {}
    assert param_importances(three) == {"learning_rate": pytest.approx(1.0)}
    summary = summary_table({"lgb": one, "xgb": three})
    assert summary["default_pauc"].to_list() == [0.1, 0.1]
    assert summary["best_pauc"].to_list() == [0.1, 0.12]
    assert summary["best_trial"].to_list() == [0, 1]
    assert summary["gain"].to_list() == pytest.approx([0.0, 0.02])
    fig = plot_importances({"lgb": param_importances(one), "xgb": param_importances(three)})
    assert "needs >= 2" in fig.axes[0].texts[0].get_text()
    assert len(fig.axes[1].patches) == 1
    assert len(plot_history({"lgb": one, "xgb": three}).axes) == 2


def test_notebook_is_thin_and_accepts_pipeline_parameters(tmp_path):
    assert_thin_and_clean(NOTEBOOK, PARAMETERS)
    (stage,) = [s for s in STAGES if s.notebook == NOTEBOOK.name]
    for preset in PRESETS:
        run = make_run(None, tmp_path, preset, tune=True)
        passed = stage.parameters(run)
        assert set(passed) == {"data_dir", "output_dir", "preset", "recipe", "image_oof_dirs"}
        best = Path(passed["output_dir"]) / TUNING_DIR / BEST_PARAMS_FILE
        assert stage.outputs(run)[0] == best


def test_notebook_tunes_all_kinds(synthetic_dir, demo_image_oof_dir, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    run_notebook(
        str(NOTEBOOK),
        {
            "data_dir": str(synthetic_dir),
            "output_dir": str(out),
            "preset": "demo",
            "image_oof_dirs": [str(demo_image_oof_dir)],
            "n_trials": 2,
            "timeout": 60,
            "threads": 1,
        },
        tmp_path,
        monkeypatch,
    )
    tuning = out / TUNING_DIR
    best = load_params(tuning / BEST_PARAMS_FILE)
    assert set(best) == set(SEARCH_SPACES)
    for kind, params in best.items():
        assert set(params) == set(default_trial_params(kind, tune_cfg()))
    summary = pl.read_csv(tuning / "summary.csv")
    assert summary["kind"].to_list() == ["lgb", "cat", "xgb"]
    assert summary["trials"].to_list() == [2, 2, 2]
    # the default row is stage 3's own CV of the published (demo-sized) lgb params
    data = load_training_frame(synthetic_dir, [demo_image_oof_dir], DEMO_FOLDS)
    centre = {**resolve_params(DEMO_GBDT), "lgb": centre_params("lgb", tune_cfg())}
    members = make_members(data.meta_features, data.image_columns, centre, names=["lgb"])
    cv = cross_validate(data.frame, data.y, data.folds, members, threads=1)
    assert summary["default_pauc"][0] == pytest.approx(cv.overall_scores()["lgb"], abs=1e-12)
    assert verify_manifest(tuning) == []
    assert summary["study"].str.split("-").list.last().n_unique() == 1  # one setup
    for plot in ("history.png", "importance.png"):
        assert (tuning / plot).stat().st_size > 1000
    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    assert "img_vit_tiny" in json.dumps(executed)


def test_notebook_takes_kinds_as_papermill_delivers_them(
    synthetic_dir, demo_image_oof_dir, tmp_path, monkeypatch
):
    out = tmp_path / "runs"
    parameters = {"data_dir": str(synthetic_dir), "output_dir": str(out), "preset": "demo"}
    # `papermill -p kinds '["lgb"]' -p n_trials 1` passes the list as a string
    parameters |= {"kinds": '["lgb"]', "n_trials": 1, "threads": 1}
    parameters["image_oof_dirs"] = str(demo_image_oof_dir)  # one plain string: a single item
    run_notebook(str(NOTEBOOK), parameters, tmp_path, monkeypatch)
    summary = pl.read_csv(out / TUNING_DIR / "summary.csv")
    assert summary["kind"].to_list() == ["lgb"] and summary["trials"].to_list() == [1]
