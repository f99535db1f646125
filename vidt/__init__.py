"""ViDT object detection with VkD feature distillation (see README.md in this folder)."""
