"""DeiT's ``samplers`` module; the samplers themselves live in ``vkd.data.samplers``."""
from vkd.data.samplers import DistributedEvalSampler, RASampler, SeededRandomSampler

__all__ = ["DistributedEvalSampler", "RASampler", "SeededRandomSampler"]
