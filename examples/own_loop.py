"""VkD in your own training loop: any timm student from any timm teacher (docs/own-loop.md)."""
import torch
import torch.nn.functional as F

import vkd


def distil(student, teacher, loader, epochs=1, lr=1e-3, alpha=1.0, gamma=1.0):
    """Train ``student`` on ``loader`` (images, labels) with VkD's feature and logit terms; returns the losses."""
    vkd.freeze(teacher)
    device = next(student.parameters()).device  # the teacher is expected on it too
    projector = vkd.OrthogonalProjector(vkd.feature_width(student), vkd.feature_width(teacher)).to(device)
    optimizer = torch.optim.AdamW([
        {"params": student.parameters(), "weight_decay": 0.05},
        {"params": projector.parameters(), "weight_decay": 0.0},  # decay would break the orthogonal map
    ], lr=lr)
    losses = []
    for _ in range(epochs):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                teacher_features, teacher_logits = vkd.features_and_logits(teacher, images)
            features, logits = vkd.features_and_logits(student, images)
            loss = (F.cross_entropy(logits, labels)
                    + alpha * vkd.feature_distillation_loss(projector(features), teacher_features, "layernorm")
                    + gamma * vkd.logit_distillation_loss(logits, teacher_logits, temperature=1.0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return projector, losses
