"""Frozen image networks that read generator-range images ([-1, 1], 32x32): the distillation teacher and
the local FID feature extractor.

- CLIP (the paper's teacher, as KD-DLGAN): open_clip's image tower with OpenAI's weights, downloaded by
  open_clip (its pretrained tag ``openai``) or read from a local file.
  KD-DLGAN feeds the discriminator's (augmented) inputs to CLIP ViT-B/32 upsampled x7 by nearest
  neighbour (32 -> 224) and *without* CLIP's mean/std normalisation; ``--clip-normalise`` adds it.
- timm: any timm model from a local file; the pooled pre-logits features, on images normalised with
  the ImageNet mean/std (what this repository's ``main_distributed.py --train-teacher`` trains with),
  resized by nearest neighbour to the size the model was trained at.
A missing file, or a download that cannot happen, is one error naming what to fetch and the flag that takes it.
"""
import logging
import os
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from vkd import frozen
from vkd.checkpoints import first_line, load_state_dict_file
from vkd.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vkd.downloads import hub_offline_unless_reachable
from vkd.errors import CheckpointError
from vkd.teachers import create_teacher

CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32 uses QuickGELU
CLIP_PRETRAINED = "openai"  # open_clip's tag of OpenAI's weights, the paper's teacher
CLIP_INPUT_SIZE = 224
CLIP_WEIGHTS_HINT = ("open_clip's OpenAI ViT-B/32 weights, e.g. open_clip_pytorch_model.bin from the Hugging Face "
                     "repository timm/vit_base_patch32_clip_224.openai")


def require_file(path: Optional[str], what: str, flag: str, hint: str) -> str:
    """``path`` when it is a file; else a one-line CheckpointError naming what to download and the flag."""
    if not path:
        raise CheckpointError(f"{what} needs a local weights file: download {hint} and pass it with {flag} FILE")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file not found: {path}; download {hint} and pass it with {flag} FILE")
    return path


def resize_nearest(images: torch.Tensor, size: int) -> torch.Tensor:
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="nearest")


class FrozenImageNetwork(nn.Module):
    """Base: frozen, always in eval mode, fp32 outputs. ``forward`` returns (features [B, D], logits or None).
    ``source`` says where the weights came from (a file, or what was downloaded)."""

    feature_dim: int
    name: str
    source: str

    def freeze(self) -> None:
        frozen.freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)


class TimmNetwork(FrozenImageNetwork):
    def __init__(self, model: nn.Module, input_size: int, name: str):
        super().__init__()
        self.model, self.input_size, self.name = model, input_size, name
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()
        with torch.no_grad():
            self.feature_dim = self(torch.zeros(1, 3, input_size, input_size))[0].shape[1]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = (resize_nearest(images, self.input_size) + 1) / 2
        hidden = self.model.forward_features((x - self.mean) / self.std)
        return (self.model.forward_head(hidden, pre_logits=True).float(), self.model.forward_head(hidden).float())


def _classifier_outputs(name: str, state_dict) -> int:
    """The number of classes a timm state dict was trained for, read from its classifier weight."""
    classifier = timm.create_model(name, pretrained=False, num_classes=1).pretrained_cfg.get("classifier")
    key = f"{classifier}.weight" if classifier else None
    if key not in state_dict:
        raise CheckpointError(f"cannot find the classifier ('{key}') of {name} in the weights file")
    return int(state_dict[key].shape[0])


def load_timm_network(name: str, path: Optional[str], input_size: int, flag: str) -> TimmNetwork:
    """A timm model strictly loaded from ``path`` (a dict with 'model', or a bare state dict)."""
    require_file(path, f"timm model '{name}'", flag,
                 f"or train the weights (python main_distributed.py --train-teacher --teacher {name} ...)")
    if name not in timm.list_models():
        raise CheckpointError(f"unknown timm model '{name}'")
    num_classes = _classifier_outputs(name, load_state_dict_file(path, preferred_keys=("model", "state_dict")))
    model = create_teacher(name, num_classes=num_classes, teacher_path=path)
    network = TimmNetwork(model, input_size, name)
    network.source = os.path.abspath(path)
    return network


class ClipImageEncoder(FrozenImageNetwork):
    def __init__(self, model: nn.Module, input_size: int, normalise: bool, name: str, half: bool):
        super().__init__()
        self.visual, self.input_size, self.normalise, self.half = model.visual, input_size, normalise, half
        self.name = name
        self.feature_dim = int(model.visual.output_dim)
        from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, None]:
        x = resize_nearest(images, self.input_size)
        if self.normalise:
            x = ((x + 1) / 2 - self.mean) / self.std
        # KD-DLGAN runs CLIP in fp16 on the GPU; the loss needs fp32 (Cholesky).
        x = x.half() if self.half else x
        return self.visual(x).float(), None


def _download_clip(open_clip, model_name: str) -> Tuple[nn.Module, str]:
    """open_clip's ``model_name`` with its ``openai`` weights, fetched (or found in its cache) by open_clip,
    and where they came from."""
    what = f"open_clip's {model_name} weights (pretrained tag '{CLIP_PRETRAINED}')"
    config = open_clip.get_pretrained_cfg(model_name, CLIP_PRETRAINED)
    if not config:
        raise CheckpointError(f"open_clip has no {what}; pass --teacher-path FILE with local weights")
    origin = f"the Hugging Face hub's {config['hf_hub'].rstrip('/')}" if config.get("hf_hub") else config["url"]
    # open_clip fetches from the hub when the tag names a repository there (every 'openai' tag does) and
    # huggingface_hub is installed (timm needs it): the hub is what to probe.
    with hub_offline_unless_reachable() as offline:
        logging.disable(logging.ERROR)  # open_clip logs the failure it raises; the error below is its one line
        try:
            model = open_clip.create_model(model_name, pretrained=CLIP_PRETRAINED)
        except Exception as error:  # no network and no cache, an interrupted download, a refused file ...
            reason = ("the hub is offline or cannot be reached, and they are not cached" if offline
                      else first_line(error))
            raise CheckpointError(f"could not download {what} from {origin} ({reason}); pass --teacher-path FILE "
                                  f"with {CLIP_WEIGHTS_HINT}") from None
        finally:
            logging.disable(logging.NOTSET)
    return model, f"{what} from {origin}"


def _clip_from_file(open_clip, path: str, model_name: str) -> nn.Module:
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file  # safe by design: tensors only
        try:
            state_dict = load_file(path)
        except SafetensorError as error:  # a corrupt or truncated file: its own error type, not an OSError
            raise CheckpointError(f"could not read {path}: not a complete safetensors file "
                                  f"({str(error).splitlines()[0]}); download {CLIP_WEIGHTS_HINT}") from None
    else:
        state_dict = load_state_dict_file(path, preferred_keys=("state_dict", "model"))
    # open_clip warns that the model is "initialized randomly": true until the strict load below.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(model_name, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path} is not an open_clip {model_name} state dict "
                              f"({str(error).splitlines()[0]}); download {CLIP_WEIGHTS_HINT}") from None
    return model


def load_clip(path: Optional[str], model_name: str = CLIP_MODEL, input_size: int = CLIP_INPUT_SIZE,
              normalise: bool = False, device: torch.device = torch.device("cpu")) -> ClipImageEncoder:
    """open_clip's image encoder with weights from a local open_clip state dict (.bin/.pt or .safetensors),
    or, without ``path``, open_clip's download of the ``openai`` weights (kept in its cache)."""
    if path:
        require_file(path, "the CLIP teacher", "--teacher-path", CLIP_WEIGHTS_HINT)
    try:
        import open_clip
    except ImportError:
        raise CheckpointError("the CLIP teacher needs open_clip: pip install open_clip_torch") from None
    if path:
        model, source = _clip_from_file(open_clip, path, model_name), os.path.abspath(path)
    else:
        model, source = _download_clip(open_clip, model_name)
    half = device.type == "cuda"
    if half:
        model.half()
    # .to(device) after building: the encoder's normalisation buffers are created on the CPU.
    encoder = ClipImageEncoder(model, input_size, normalise, f"CLIP {model_name}", half).to(device)
    encoder.source = source
    return encoder
