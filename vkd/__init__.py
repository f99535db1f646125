"""VkD: knowledge distillation with orthogonal projections (CVPR 2024), the shared core of this repository."""
