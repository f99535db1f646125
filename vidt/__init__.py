"""ViDT object detection with VkD feature distillation (see ../shared/VIDT_SPEC.md)."""
