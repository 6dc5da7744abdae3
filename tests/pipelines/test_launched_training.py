"""A Kedro node whose trainer asks for several processes (as ``conf/gpu`` does with one per
GPU): the node launches the shared trainer in them and saves its outputs once."""

import json

import torch
import yaml
from safetensors.torch import load_file


def test_user_branches_train_in_two_processes_from_kedro_run(smoke_diffused, smoke_copy, run_in):
    project = smoke_copy("user_branch_*")  # those trainings start afresh in the copy
    parameters = yaml.safe_load((project / "conf/base/parameters_diffusion.yml").read_text())
    only_prefgen = {name: None for name in parameters["diffusion"]["variants"] if name != "prefgen"}
    data = run_in(
        project,
        node_names=["diffusion.train_user_branches"],
        runtime_params={"diffusion": {"train": {"processes": 2}, "variants": only_prefgen}},
    )

    report = json.loads((data / "08_reporting" / "diffusion_training_report.json").read_text())
    assert set(report["variants"]) == {"prefgen"}
    run = report["variants"]["prefgen"]["run"]
    assert (run["steps_trained"], run["reused"]) == (2, False)
    run_dir = project / run["run_dir"]
    assert json.loads((run_dir / "run_key.json").read_text())["num_processes"] == 2
    runs = sorted(path.name for path in run_dir.parent.glob("user_branch_*"))
    assert runs == [run_dir.name]  # the launch leaves nothing beside its run
    # What the node saved is what the two processes trained; the checkpoint holds only that.
    trained = load_file(run_dir / "checkpoint-2" / "model.safetensors")
    saved = load_file(data / "06_models" / "user_branches" / "model.safetensors")
    assert trained and all(name.startswith("adapter.") for name in trained)
    for name, tensor in trained.items():
        torch.testing.assert_close(saved[name.replace("adapter.", "adapters.prefgen.", 1)], tensor)


def test_the_mllm_tunes_in_two_processes_with_its_validation_curve(smoke_tuned, smoke_copy, run_in):
    project = smoke_copy("vqa_tuning_stage*")
    stage = {"max_steps": 2, "batch_size": 2, "learning_rate": 1.0e-3, "log_every": 1}
    stages = [
        {"k": 1, "train": {**stage, "processes": 2}},
        {"k": 2, "questions_per_context": 2, "train": {**stage, "processes": 2}},
    ]
    data = run_in(
        project,
        node_names=["vqa_tuning.tune_mllm"],
        runtime_params={"vqa_tuning": {"stages": stages}},
    )

    report = json.loads((data / "08_reporting" / "vqa_tuning_report.json").read_text())
    assert [stage["steps"] for stage in report["stages"]] == [2, 2]
    # The curve is scored on the main process of each launched stage and kept in its history.
    curve = report["learning_curve"]
    assert [point["step"] for point in curve] == [1, 2, 1, 2]
    assert all(0 <= point["val_accuracy"] <= 1 for point in curve)
    runs = sorted((data / "06_models" / "checkpoints").glob("vqa_tuning_stage*/run_key.json"))
    assert [json.loads(run.read_text())["num_processes"] for run in runs] == [2, 2]
