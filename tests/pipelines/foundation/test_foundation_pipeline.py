import json
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog
from transformers import AutoModelForImageTextToText, AutoProcessor

from prefgen_kedro.foundation import require_current_world, weight_hashes
from prefgen_kedro.models.clip import conditioning_clip_encoders, evaluation_clip_encoders
from prefgen_kedro.models.diffusion import generate
from prefgen_kedro.models.mllm import MllmPreferenceModel, PreferenceContext
from prefgen_kedro.world.agent_world import render_set
from prefgen_kedro.world.vocabulary import CATEGORIES

# Each model's training steps in conf/smoke.
SMOKE_STEPS = {
    "conditioning_clip": 3,
    "evaluation_clip": 3,
    "attribute_oracle": 3,
    "base_unet": 2,
    "mllm": 4,  # two stages of 2
}


def test_foundation_runs_on_smoke_and_writes_a_true_manifest(smoke_foundation, smoke_data):
    folder = smoke_foundation
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest) == set(SMOKE_STEPS)
    for name, steps in SMOKE_STEPS.items():
        entry = manifest[name]
        require_current_world(manifest, name)
        assert entry["sha256"] == weight_hashes(folder / name)
        assert entry["parameters"] > 0
        assert entry["command"].startswith("kedro")
        assert entry["steps"] == steps
        assert entry["trained_seconds"] is not None  # trained here, so its time is known
    # Nothing is pickled: weights are safetensors only.
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))

    for name in ("conditioning_clip", "evaluation_clip", "attribute_oracle"):
        assert set(manifest[name]["metrics"]) == {"subject", *CATEGORIES}
    adherence = manifest["base_unet"]["metrics"]["prompt_adherence"]
    assert set(adherence) == {"subject", *CATEGORIES}
    assert manifest["base_unet"]["metrics"]["vs_heldout_renders"]["fid"] > 0
    heldout = manifest["mllm"]["metrics"]["heldout_simulated_users"]
    assert set(heldout) == {"k1", "k2"}
    assert all(0 <= v["accuracy"] <= 1 and 0 <= v["counting_rule"] <= 1 for v in heldout.values())
    curve = manifest["mllm"]["learning_curve"]
    assert [stage["stage"] for stage in curve] == ["caption", "match"]
    assert all(stage["learning_curve"] and stage["heldout"] for stage in curve)

    reports = smoke_data / "08_reporting"
    metrics = json.loads((reports / "encoders_metrics.json").read_text())
    assert metrics["fid_network"]["self"]["fid"] < 1e-6
    assert (reports / "base_diffusion_grid.png").is_file()

    _check_models_load_back_through_the_catalog(folder)


def _check_models_load_back_through_the_catalog(folder):
    classes = {
        "conditioning_clip": "transformers.CLIPModel",
        "clip_tokenizer": "transformers.CLIPTokenizer",
        "evaluation_clip": "prefgen_kedro.models.clip.EvaluationClip",
        "attribute_oracle": "prefgen_kedro.models.oracle.AttributeOracle",
        "base_unet": "diffusers.UNet2DConditionModel",
        "noise_scheduler": "diffusers.DDPMScheduler",
    }
    # As conf/base/catalog.yml declares them.
    catalog = DataCatalog.from_config(
        {
            name: {
                "type": "prefgen_kedro.datasets.PretrainedModelDataset",
                "path": str(folder / name),
                "model_class": model_class,
            }
            | ({"load_args": {"dtype": "float32"}} if name == "conditioning_clip" else {})
            for name, model_class in classes.items()
        }
    )
    renders = render_set(4, seed=0, size=16)
    encode_images, encode_texts = conditioning_clip_encoders(
        catalog.load("conditioning_clip"), catalog.load("clip_tokenizer")
    )
    assert encode_images(renders.images).shape[0] == 4
    assert torch.allclose(encode_texts(renders.captions).norm(dim=-1), torch.ones(4), atol=1e-3)
    encode_images, _ = evaluation_clip_encoders(catalog.load("evaluation_clip").float())
    assert encode_images(renders.images).shape[0] == 4
    predicted = catalog.load("attribute_oracle").float().predict(renders.images)
    assert set(predicted) == {"subject", "subject_colour", "background", "pattern"} | {
        "composition",
        "tone",
    }
    assert all(len(v) == 4 for v in predicted.values())
    clip = catalog.load("conditioning_clip")
    images = generate(
        catalog.load("base_unet").float(),
        catalog.load("noise_scheduler"),
        clip.text_model,
        catalog.load("clip_tokenizer"),
        renders.captions,
        guidance_scale=2.0,
        num_inference_steps=2,
        seed=0,
    )
    assert images.shape == renders.images.shape and images.dtype == np.uint8

    # The MLLM takes the road a hub checkpoint takes: the Auto classes, from a directory.
    mllm = AutoModelForImageTextToText.from_pretrained(folder / "mllm", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder / "mllm_processor")
    judge = MllmPreferenceModel(mllm, processor, slot_positions=True)
    context = PreferenceContext(liked=list(renders.images[:2]), disliked=list(renders.images[2:3]))
    p_yes = judge.judge([context, context], [renders.images[3], renders.images[0]])
    assert p_yes.shape == (2,) and ((p_yes > 0) & (p_yes < 1)).all()


def test_foundation_mllm_remakes_only_the_mllm_and_its_manifest_entry(
    smoke_foundation, smoke_project, tmp_path, monkeypatch
):
    project = tmp_path / "project"  # a copy: the session's smoke models stay as they are
    shutil.copytree(smoke_project, project)
    folder = project / smoke_foundation.relative_to(smoke_project)
    shipped = json.loads((folder / "manifest.json").read_text())
    others = {name: (folder / name).stat().st_mtime_ns for name in shipped if name != "mllm"}

    monkeypatch.chdir(project)
    bootstrap_project(project)
    changed = {"foundation": {"mllm": {"architecture": {"matching_attention_std": 0.5}}}}
    with KedroSession.create(project_path=project, env="smoke", runtime_params=changed) as session:
        session.run(pipeline_names=["foundation_mllm"])

    manifest = json.loads((folder / "manifest.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "mllm"} == {
        k: v for k, v in shipped.items() if k != "mllm"
    }
    assert others == {name: (folder / name).stat().st_mtime_ns for name in others}
    remade = manifest["mllm"]
    assert remade["sha256"] == weight_hashes(folder / "mllm") != shipped["mllm"]["sha256"]
    assert remade["steps"] == SMOKE_STEPS["mllm"]
    attention = (
        AutoModelForImageTextToText.from_pretrained(folder / "mllm")
        .model.language_model.layers[0]
        .self_attn
    )
    # the changed setting: key projections started equal to the query ones (4 steps ago)
    similarity = F.cosine_similarity(
        attention.q_proj.weight.flatten(), attention.k_proj.weight.flatten(), dim=0
    )
    assert similarity > 0.9
