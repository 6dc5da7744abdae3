"""The ``vqa_tuning`` pipeline on ``smoke``: questions, the tuned model, metrics and the plot."""

import json

import pandas as pd
import torch
from transformers import AutoModelForImageTextToText

from prefgen_kedro.models.vqa import examples_from_table


def test_vqa_tuning_runs_on_smoke(smoke_tuned, smoke_foundation):
    data = smoke_tuned
    users = pd.read_parquet(data / "02_intermediate" / "users.parquet").set_index("user_id")
    table = pd.read_parquet(data / "05_model_input" / "vqa_examples.parquet")
    assert set(table["split"]) == {"train", "val"}
    for split, rows in table.groupby("split"):
        assert set(users.loc[rows["user_id"], "split"]) == {split}
        for example in examples_from_table(rows):
            assert example.query not in example.liked + example.disliked
    # K ramps 1 -> 2 (conf/smoke); validation asks at the last K
    assert table.groupby("stage")["liked"].apply(lambda c: {len(x) for x in c}).to_dict() == {
        -1: {2},
        0: {1},
        1: {2},
    }

    metrics = json.loads((data / "08_reporting" / "vqa_metrics.json").read_text())
    accuracy = metrics["accuracy"]
    assert set(accuracy) == {
        "tuned",
        "untuned",
        "majority_class",
        "counting_rule",
        "label_noise_ceiling",
    }
    assert all(0 <= value <= 1 for value in accuracy.values())
    assert 0 <= metrics["judge_agreement_with_utility_sign"] <= 1
    assert metrics["k"] == 2 and metrics["questions"] == len(table[table["split"] == "val"])
    assert metrics["example_answers"] and all(a["expected"] for a in metrics["example_answers"])
    report = json.loads((data / "08_reporting" / "vqa_tuning_report.json").read_text())
    assert [stage["steps"] for stage in report["stages"]] == [2, 2]
    curve = report["learning_curve"]
    # Stage 1 asks 2 questions a context (its users' last chat may ask 1): 4 chats a step.
    stage1 = table[table["stage"] == 1]
    per_chat = len(stage1) / (stage1["turn"] == 0).sum()
    assert 1 < per_chat <= 2 and stage1["turn"].max() == 1
    assert [point["questions_seen"] for point in curve] == [
        4,
        8,
        8 + round(4 * per_chat),
        8 + round(8 * per_chat),
    ]
    assert all(stage["questions_per_second"] > 0 for stage in report["stages"])
    assert (data / "08_reporting" / "vqa_learning_curve.png").stat().st_size > 0

    tuned = AutoModelForImageTextToText.from_pretrained(
        data / "06_models" / "tuned_mllm", dtype=torch.float32
    )
    pretrained = AutoModelForImageTextToText.from_pretrained(
        smoke_foundation / "mllm", dtype=torch.float32
    )
    changed = [
        name
        for (name, a), (_, b) in zip(
            tuned.named_parameters(), pretrained.named_parameters(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed and not any("vision_tower" in name for name in changed)
