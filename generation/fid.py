"""FID and Inception Score of a generator, with torchmetrics' statistics (never hand-rolled).

Two feature networks:
- ``inception``: the paper's protocol. torch-fidelity's port of the TF Inception-v3 (2015-12-05) that
  StyleGAN's ``inception_v3_features.pkl`` also holds: uint8 images, TF1-compatible bilinear resize to
  299, 2048-d pool features for FID and the 1008 unbiased logits for IS. Its weights
  ``weights-inception-2015-12-05-6726825d.pth``: a local file (``--fid-weights``), else torch-fidelity's
  release file, downloaded once into torch.hub's cache (where torch-fidelity keeps it too).
- ``timm``: any local timm classifier (the offline runs). Its FID is on another feature space and is
  **not comparable with Inception FIDs**; every output that reports it says so.
The network computes features once per batch; the identity modules below hand those features to
torchmetrics' FrechetInceptionDistance and InceptionScore, so one pass serves both metrics.
"""
import contextlib
import http.client
import os
import urllib.parse
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from generation.teachers import FrozenImageNetwork, load_timm_network, require_file
from vkd import downloads
from vkd.checkpoints import first_line, safe_torch_load
from vkd.errors import CheckpointError

INCEPTION_FILE = os.path.basename(urllib.parse.urlparse(URL_INCEPTION_V3).path)
INCEPTION_HINT = f"torch-fidelity's Inception weights {INCEPTION_FILE} from {URL_INCEPTION_V3}"
FID_EXTRACTORS = ("inception", "timm", "none")
NOT_COMPARABLE = "not comparable with Inception FIDs"


class FeatureRows(nn.Module):
    """Identity over rows of precomputed features: torchmetrics then only does the statistics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


@contextlib.contextmanager
def _forced_weights_only_load():
    """torch-fidelity reads its file with weights_only=False; torch's switch makes that a safe load too."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


class InceptionNetwork(FrozenImageNetwork):
    name = "Inception-v3 (TF 2015-12-05, torch-fidelity)"
    feature_dim = 2048

    def __init__(self, weights_path: str, source: Optional[str] = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        safe_torch_load(weights_path)  # a one-line error for an unreadable or unsafe file, before torch-fidelity
        with _forced_weights_only_load():
            self.network = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path)
        self.source = source or os.path.abspath(weights_path)
        self.freeze()

    def forward(self, images: torch.Tensor):
        # The TF protocol quantises samples to 8 bits before the network sees them.
        quantised = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        features, logits = self.network(quantised)
        return features.float(), logits.float()


def download_inception_weights() -> str:
    """torch-fidelity's Inception weights in torch.hub's cache, downloaded from its release the first time.

    The cache file is torch-fidelity's own (``torch.hub.load_state_dict_from_url``'s name for the URL), so
    either finds the other's copy; the file is then read like a local one, with the safe loader.
    """
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return cached
    cannot = f"could not download torch-fidelity's Inception weights from {URL_INCEPTION_V3}"
    instead = f"pass --fid-weights FILE with a local copy of {INCEPTION_FILE}"
    if not downloads.reachable(URL_INCEPTION_V3):
        raise CheckpointError(f"{cannot} (the server cannot be reached); {instead}")
    print(f"Downloading {URL_INCEPTION_V3} to {cached}", flush=True)
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        # Written to a temporary name and renamed when complete: an interrupted download leaves no file.
        torch.hub.download_url_to_file(URL_INCEPTION_V3, cached, progress=True)
    except (OSError, http.client.HTTPException) as error:  # urllib's URLError, HTTPError and timeouts are OSErrors
        raise CheckpointError(f"{cannot} ({first_line(error)}); {instead}") from None
    return cached


def build_fid_network(kind: str, weights_path: Optional[str], timm_name: str, input_size: int) -> FrozenImageNetwork:
    if kind == "inception":
        if weights_path:
            require_file(weights_path, "FID with Inception", "--fid-weights", INCEPTION_HINT)
            return InceptionNetwork(weights_path)
        cached = download_inception_weights()
        return InceptionNetwork(cached, f"{URL_INCEPTION_V3}, cached as {cached}")
    return load_timm_network(timm_name, weights_path, input_size, "--fid-weights")


class GeneratorEvaluator:
    """FID (and IS when the network has a classifier) of generated samples against fixed real images.

    The real statistics are computed once. ``comparable`` is False for any network but Inception, and
    ``describe`` then says so in the line it prints.
    """

    def __init__(self, network: FrozenImageNetwork, reference_images: torch.Tensor, batch_size: int,
                 device: torch.device, is_splits: int = 10):
        self.network = network.to(device)
        self.batch_size, self.device, self.is_splits = batch_size, device, is_splits
        self.comparable = isinstance(network, InceptionNetwork)
        self.fid = FrechetInceptionDistance(feature=FeatureRows(network.feature_dim), reset_real_features=False,
                                            sync_on_compute=False)
        self.num_reference = len(reference_images)
        for start in range(0, len(reference_images), batch_size):
            features, _ = self._features(reference_images[start:start + batch_size])
            self.fid.update(features, real=True)

    @torch.no_grad()
    def _features(self, images: torch.Tensor):
        features, logits = self.network(images.to(self.device))
        return features.double().cpu(), (logits.double().cpu() if logits is not None else None)

    def evaluate(self, sample: Callable[[int], torch.Tensor], num_samples: int) -> Dict[str, float]:
        """``sample(n)`` returns n generated images in [-1, 1]; returns fid (and is_mean, is_std)."""
        self.fid.reset()
        with warnings.catch_warnings():  # its note that it keeps every feature: a few MB at 10k samples
            warnings.simplefilter("ignore", UserWarning)
            inception_score = InceptionScore(feature=FeatureRows(0), splits=self.is_splits, sync_on_compute=False)
        has_logits = False
        for start in range(0, num_samples, self.batch_size):
            features, logits = self._features(sample(min(self.batch_size, num_samples - start)))
            self.fid.update(features, real=False)
            if logits is not None:
                inception_score.update(logits)
                has_logits = True
        results = {"fid": float(self.fid.compute()), "fid_samples": num_samples,
                   "fid_reference_images": self.num_reference, "fid_network": self.network.name,
                   "fid_comparable_with_inception": self.comparable}
        if has_logits:
            mean, std = inception_score.compute()
            results.update(is_mean=float(mean), is_std=float(std))
        return results

    def describe(self, results: Dict[str, float]) -> str:
        note = "" if self.comparable else f" [{self.network.name} features: {NOT_COMPARABLE}]"
        text = f"FID {results['fid']:.3f} ({results['fid_samples']} samples vs {self.num_reference} real){note}"
        if "is_mean" in results:
            text += f"; IS {results['is_mean']:.3f} +- {results['is_std']:.3f}"
        return text
