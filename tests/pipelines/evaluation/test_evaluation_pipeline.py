"""The ``evaluation`` pipeline on ``smoke``: every method scored on the same cases, a
metrics table with intervals, the report in both forms, and the notebook that reads them."""

import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from prefgen_kedro.params import EvaluationParams
from prefgen_kedro.pipelines.evaluation.nodes import summarize_metrics

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "benchmark.ipynb"
METHODS = {
    "base",
    "viper_style",
    "ip_adapter",
    "mean_clip",
    "prefgen",
    "prefgen_no_mmd",
    "prefgen_no_core",
    "prefgen_no_sem",
    "prefgen_no_img",
    "oracle_taste",
    "oracle_state",
}


def test_every_method_is_scored_on_the_same_cases(smoke_evaluated):
    generations = pd.read_csv(smoke_evaluated / "07_model_output" / "generations.csv")
    assert set(generations["method"]) == METHODS | {"real"}
    per_method = generations[generations["method"] != "real"].groupby("method")
    cases = {tuple(map(tuple, g[["user_id", "subject", "seed"]].to_numpy())) for _, g in per_method}
    assert len(cases) == 1  # same users, subjects and seeds for every method
    for key in generations["image"]:
        assert (smoke_evaluated / "07_model_output" / "generations" / f"{key}.png").exists()
    # what each method's text encoder read: ê_sem's attributes said in prefgen's caption
    of = {m: g.set_index(["user_id", "case"]) for m, g in per_method}
    assert (of["base"]["sampled_prompt"] == of["base"]["prompt"]).all()
    prefgen = of["prefgen"]
    assert (prefgen["sampled_prompt"] != prefgen["prompt"]).all()
    assert all(
        s in said for s, said in zip(prefgen["subject"], prefgen["sampled_prompt"], strict=True)
    )

    metrics = pd.read_csv(smoke_evaluated / "08_reporting" / "metrics.csv")
    assert set(metrics.columns) == {"method", "metric", "mean", "ci_low", "ci_high", "n"}
    expected = {"like_rate", "utility", "judge_p_yes", "clip_i", "clip_score", "fid", "kid"}
    for method in METHODS | {"real"}:
        assert expected <= set(metrics.loc[metrics["method"] == method, "metric"])
    with_interval = metrics.dropna(subset=["ci_low"])
    assert set(metrics["metric"]) - set(with_interval["metric"]) == {"taste_auc"}
    assert (with_interval["ci_low"] <= with_interval["mean"] + 1e-9).all()
    assert (with_interval["mean"] <= with_interval["ci_high"] + 1e-9).all()
    # the signal ladder's rows: each rung's taste AUC beside its like-rate
    ladder = metrics[metrics["metric"] == "taste_auc"].set_index("method")["mean"]
    assert {"real", "oracle_taste", "oracle_state", "prefgen"} <= set(ladder.index)
    wins = metrics[metrics["metric"] == "win_rate_of_prefgen"]
    assert set(wins["method"]) == METHODS - {"prefgen"}


def test_the_taste_audit_covers_every_condition_part(smoke_evaluated):
    audit = json.loads((smoke_evaluated / "08_reporting" / "taste_signal_audit.json").read_text())
    assert set(audit["auc"]) == {
        "counting_rule",
        "mean_clip",
        "e_img",
        "e_core",
        "e_sem",
        "e_sem_hat",
        "e_sem_hat_no_mmd",
        "oracle_state_hat",
        "counting_rule_picks",
        "true_sem",
    }
    assert all(0.0 <= auc <= 1.0 for auc in audit["auc"].values())
    assert audit["split"] == "test" and audit["users"] > 0


def test_the_report_states_its_command_and_is_self_contained(smoke_evaluated):
    markdown = (smoke_evaluated / "08_reporting" / "benchmark.md").read_text()
    assert "`kedro run --pipelines evaluation --env smoke`" in markdown
    assert "## Preference alignment" in markdown and "Verdict:" in markdown
    ladder = markdown[markdown.index("## Signal ladder") :].split("\n\n")[2].splitlines()[2:]
    rows = [line.split("|")[1].strip(" `*") for line in ladder]
    assert rows == ["real", "oracle_taste", "oracle_state", "prefgen"]
    assert (
        "How `prefgen`'s condition reaches the UNet: its prompt says the attributes named by "
        "`e_sem_hat`; its user branch reads `e_core`, `e_img`." in markdown
    )
    assert "## Where the time went" in markdown and "| evaluation.generate_images |" in markdown
    timings = json.loads((smoke_evaluated / "08_reporting" / "timings.json").read_text())
    assert [n["node"] for n in timings["nodes"]][-1] == "evaluation.write_benchmark_report"
    assert all(n["seconds"] >= 0 and n["peak_rss_gb"] > 0 for n in timings["nodes"])
    for link in re.findall(r"\]\((benchmark/[^)]+)\)", markdown):
        assert (smoke_evaluated / "08_reporting" / link).exists()
    page = (smoke_evaluated / "08_reporting" / "benchmark.html").read_text()
    assert all(s.startswith("data:") for s in re.findall(r'src="([^"]*)"', page))
    assert "<table>" in page


def test_the_notebook_runs_on_the_catalog(smoke_evaluated, smoke_project, monkeypatch):
    monkeypatch.setenv("PREFGEN_KEDRO_PROJECT", str(smoke_project))
    monkeypatch.setenv("PREFGEN_KEDRO_ENV", "smoke")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("grid_" in str(o.get("text", "")) for o in outputs)


def test_win_rates_count_users_and_ties():
    scores = pd.DataFrame(
        {
            "method": ["prefgen"] * 3 + ["base"] * 3,
            "user_id": ["a", "b", "c"] * 2,
            "utility": [1.0, 0.0, -1.0, 0.0, 0.0, 2.0],
            "liked": [True, False, False, False, False, True],
            "subject_correct": [True] * 6,
            "clip_score": [20.0] * 6,
            "clip_i": [0.0] * 6,
            "judge_p_yes": [0.9, 0.2, 0.6, 0.4, 0.4, 0.4],
        }
    )
    params = EvaluationParams(
        split="test",
        prompts_per_user=1,
        seed=0,
        methods=["base", "prefgen"],
        references=[],
        reference_method="prefgen",
        fid_reference_split="val",
        fid_reference_size=2,
        fid_cache_root="unused",
        inception_batch_size=1,
        judge_batch_size=1,
        bootstrap={"resamples": 100, "set_resamples": 10, "level": 0.95, "seed": 0},
        grid_users=1,
        targets={"like_rate_gain": 25, "fid_ratio": 1.1},
    )
    audit = {"users": 3, "auc": {"counting_rule": 0.86, "e_sem_hat": 0.7, "true_sem": 1.0}}
    metrics = summarize_metrics(scores, pd.DataFrame(), audit, params).set_index(
        ["method", "metric"]
    )
    # the taste AUC of what each method reads, where the audit measured it
    assert metrics.loc[("prefgen", "taste_auc"), "mean"] == pytest.approx(0.7)
    assert ("base", "taste_auc") not in metrics.index
    # per user: a wins, b ties, c loses
    assert metrics.loc[("base", "win_rate_of_prefgen"), "mean"] == pytest.approx(0.5)
    assert metrics.loc[("prefgen", "like_rate"), "mean"] == pytest.approx(1 / 3)
    # judge > 0.5 agrees with the oracle's verdict on a (yes/liked) and b (no/not liked)
    assert metrics.loc[("prefgen", "judge_oracle_agreement"), "mean"] == pytest.approx(2 / 3)
    assert metrics.loc[("base", "judge_oracle_agreement"), "mean"] == pytest.approx(2 / 3)
