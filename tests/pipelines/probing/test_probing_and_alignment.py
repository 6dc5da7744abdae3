"""``probing`` and ``alignment`` on ``smoke``: probe curves, chosen layers, user embeddings."""

import json

import numpy as np
import pandas as pd
import torch

from prefgen_kedro.models.alignment import Aligners


def test_probing_and_alignment_run_on_smoke(smoke_aligned):
    data = smoke_aligned

    metrics = pd.read_csv(data / "08_reporting" / "probe_metrics.csv")
    layers = 3  # the smoke MLLM: embeddings + 2 layers
    assert set(metrics["task"]) == {"inter_user", "intra_user"}
    assert sorted(metrics.loc[metrics["task"] == "inter_user", "metric"].unique()) == [
        "top1",
        "top5",
    ]
    assert metrics.groupby(["task", "metric"])["layer"].apply(list).map(len).eq(layers).all()
    assert metrics["accuracy"].between(0, 1).all()
    selection = json.loads((data / "08_reporting" / "layer_selection.json").read_text())
    assert selection["e_sem"] == [2] and len(selection["e_core"]) == 1
    assert (data / "08_reporting" / "probe_accuracy_by_layer.png").stat().st_size > 0

    users = pd.read_parquet(data / "02_intermediate" / "users.parquet")
    embeddings = pd.read_parquet(data / "05_model_input" / "aligned_user_embeddings.parquet")
    # every user, test users included, from its canonical context (the first K of each side)
    assert sorted(embeddings["user_id"]) == sorted(users["user_id"])
    interactions = pd.read_parquet(data / "02_intermediate" / "interactions.parquet")
    first = embeddings.iloc[0]
    history = interactions[interactions["user_id"] == first["user_id"]]
    assert list(first["liked"]) == history.loc[history["label"] == 1, "image_id"].tolist()[:2]
    parts = ("e_sem", "e_core", "e_img", "e_sem_hat", "e_sem_hat_no_mmd", "oracle_state_hat")
    for column in parts:
        vectors = np.stack(embeddings[column].to_list())
        assert vectors.ndim == 2 and np.isfinite(vectors).all(), column
    # e_img is a normalised CLIP embedding; e_sem_hat lives in the text space
    assert np.allclose(
        np.linalg.norm(np.stack(embeddings["e_img"].to_list()), axis=1), 1, atol=1e-4
    )

    # a context's perfect summary: what its images show, liked minus disliked
    contexts = pd.read_parquet(data / "05_model_input" / "context_embeddings.parquet")
    summary = np.stack(contexts["context_summary"].to_list())
    assert summary.shape[1] == 48 and np.abs(summary).sum(axis=1).min() > 0

    alignment = json.loads((data / "08_reporting" / "alignment_metrics.json").read_text())
    for variant in ("prefgen", "prefgen_no_mmd", "oracle_state"):
        assert 0 <= alignment[variant]["retrieval"]["recall_at_5"] <= 1
        assert alignment[variant]["diversity_across_users"] >= 0
        assert np.isfinite(alignment[variant]["mmd2_to_targets"])
    assert alignment["prefgen"]["retrieval"]["phrases"] == 48
    aligners = Aligners.from_pretrained(data / "06_models" / "aligners")
    assert set(aligners.mlps) == {"prefgen", "prefgen_no_mmd", "oracle_state"}
    e_sem = torch.from_numpy(np.stack(embeddings["e_sem"].to_list())).float()
    with torch.inference_mode():
        again = aligners["prefgen"].token_sets(e_sem).flatten(1).numpy()
    e_sem_hat = np.stack(embeddings["e_sem_hat"].to_list())
    assert np.allclose(again, e_sem_hat, atol=1e-5)
    # each token is the state of one phrase of the vocabulary
    vocabulary = aligners["prefgen"].vocabulary.numpy()
    tokens = e_sem_hat.reshape(len(e_sem_hat), -1, vocabulary.shape[1])
    assert all(np.isclose(vocabulary, token).all(axis=1).any() for token in tokens[0])
    # alignment.tokens text-space states (the smoke text width) a context
    prefgen = aligners["prefgen"]
    assert (prefgen.tokens, prefgen.out_dim) == (4, 16)
    assert e_sem_hat.shape[1] == prefgen.tokens * prefgen.out_dim
