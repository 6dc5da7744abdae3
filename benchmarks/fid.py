"""The project's FID vs. a direct torch-fidelity call, on the same two uint8 image sets.

Project: the evaluation's road (``evaluation.compute_fidelity``): ``inception_features`` of
each set, then ``ReferenceStatistics(reference).fid(features)`` (exact for rank-deficient
covariances). Reference: ``torch_fidelity.calculate_metrics(fid=True)`` with the same
registered FID Inception extractor, batch size and device. The images are agent-world renders
(what the evaluation's FID reference is made of), two sets drawn with different seeds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import KEY_METRIC_FID

from benchmarks.timing import Comparison, main, time_alternately
from prefgen_kedro.models.fid import (
    ReferenceStatistics,
    UInt8ImageDataset,
    inception_features,
    register_fid_inception,
)
from prefgen_kedro.world.agent_world import render_set

BATCH_SIZE = 64  # as evaluation.inception_batch_size
IMAGE_SIZE = 32  # the agent world's


def run(quick: bool = False) -> Comparison:
    """Time both FID computations, in turn; ``quick``: 8 images a set, one timed call each."""
    images, warmup, repeats = (8, 0, 1) if quick else (48, 1, 3)
    cuda = torch.cuda.is_available()
    generated = _renders(images, seed=1)
    reference_images = _renders(images, seed=2)
    values: dict[str, float] = {}

    def project() -> None:
        statistics = ReferenceStatistics(
            inception_features(reference_images, batch_size=BATCH_SIZE, cuda=cuda)
        )
        values["project"] = statistics.fid(
            inception_features(generated, batch_size=BATCH_SIZE, cuda=cuda)
        )

    def direct() -> None:
        metrics = torch_fidelity.calculate_metrics(
            input1=UInt8ImageDataset(generated),
            input2=UInt8ImageDataset(reference_images),
            fid=True,
            feature_extractor=register_fid_inception(),
            batch_size=BATCH_SIZE,
            cuda=cuda,
            cache=False,
            save_cpu_ram=True,  # no DataLoader workers, as inception_features
            verbose=False,
        )
        values["torch-fidelity"] = metrics[KEY_METRIC_FID]

    project_timing, direct_timing = time_alternately(
        project, direct, warmup=warmup, repeats=repeats
    )
    difference = abs(values["project"] - values["torch-fidelity"]) / values["torch-fidelity"]
    return Comparison(
        title="FID: project vs. direct torch-fidelity",
        call="FID call",
        unit="images",
        items=2 * images,
        labels=("inception_features + ReferenceStatistics", "torch_fidelity.calculate_metrics"),
        project=project_timing,
        reference=direct_timing,
        details=(
            f"{images} + {images} renders of {IMAGE_SIZE}×{IMAGE_SIZE} (resized to 299 by the "
            f"extractor), batch {BATCH_SIZE}, {'cuda' if cuda else 'cpu'}, {warmup} warm-up + "
            f"{repeats} timed calls each, in turn; every call extracts both sets' features "
            "(no cache). "
            f"The two FIDs differ by {difference:.1e} relative (torch-fidelity's formula "
            "square-roots the round-off of a rank-deficient covariance product)."
        ),
        figures={"FID": (values["project"], values["torch-fidelity"])},
    )


def _renders(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, H, W) agent-world renders."""
    return render_set(n, seed=seed, size=IMAGE_SIZE).images.transpose(0, 3, 1, 2)


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
