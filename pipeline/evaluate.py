"""Evaluation: top-1/top-5 error (the paper's measure) for the centre crop and the paper's 10-crop test.

10-crop (paper §4.1): the four corner and the centre 224 patches of the 256 square plus their mirrors; the
network's softmax outputs over the ten are averaged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per sample: is the label among the k highest scores (over every output, all 1,000 classes)."""
    return (scores.topk(min(k, scores.shape[1]), dim=1).indices == labels[:, None]).any(dim=1)


def errors(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = len(labels)
    return {"top1_error": 1 - topk_correct(scores, labels, 1).sum().item() / n,
            "top5_error": 1 - topk_correct(scores, labels, 5).sum().item() / n, "samples": n}


def view_probabilities(model: torch.nn.Module, images: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Softmax over classes; a [B, V, 3, H, W] batch of V views per image gives the mean over its V softmaxes."""
    views = images.shape[1] if images.dim() == 5 else 1
    flat = images.flatten(0, 1) if images.dim() == 5 else images
    with torch.autocast(flat.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(flat)
    probs = torch.softmax(logits.float(), dim=1)
    return probs.view(len(images), views, -1).mean(dim=1)


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [N, C] on the CPU, labels [N]) over every batch, in order."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for images, target in batches:
        probs.append(view_probabilities(model, images, amp).cpu())
        labels.append(target.cpu())
    model.train(was_training)
    return torch.cat(probs), torch.cat(labels)


def per_class_accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    correct = topk_correct(probs, labels, 1)
    return {int(c): correct[labels == c].float().mean().item() for c in labels.unique()}


def confused_pairs(probs: torch.Tensor, labels: torch.Tensor, top: int = 10) -> list[dict]:
    """The most frequent (true → predicted) mistakes."""
    predicted = probs.argmax(dim=1)
    wrong = predicted != labels
    pairs, counts = torch.stack([labels[wrong], predicted[wrong]], 1).unique(dim=0, return_counts=True)
    order = counts.argsort(descending=True, stable=True)[:top]
    return [{"true": int(pairs[i, 0]), "predicted": int(pairs[i, 1]), "count": int(counts[i])} for i in order]
