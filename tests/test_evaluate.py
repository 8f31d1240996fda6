"""Evaluation math: hand-computed top-k errors, 10-crop averaging, batch-size invariance."""

from __future__ import annotations

import torch

from pipeline.evaluate import confused_pairs, errors, per_class_accuracy, predict, view_probabilities


class LookupModel(torch.nn.Module):
    """Returns hand-made logits: image i (a constant image of value i) → row i of the table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten(1)[:, 0].round().long()]


def batches(n: int, labels: list[int], batch_size: int, views: int = 0):
    for start in range(0, n, batch_size):
        ids = torch.arange(start, min(n, start + batch_size), dtype=torch.float32)
        images = ids[:, None, None, None].expand(-1, 3, 4, 4).clone()
        if views:
            images = images[:, None].expand(-1, views, -1, -1, -1).clone()
        yield images, torch.tensor(labels[start:start + batch_size])


def test_hand_made_logits_give_the_hand_computed_top1_and_top5_error():
    # 6 classes, 4 samples; the label's rank among the logits is 1, 2, 6 and 5 → top-1 hits 1/4, top-5 hits 3/4
    table = torch.tensor([[9.0, 1, 2, 3, 4, 5],   # label 0: rank 1
                          [1.0, 8, 9, 3, 4, 5],   # label 1: rank 2
                          [6.0, 5, 0, 3, 4, 2],   # label 2: rank 6 (lowest)
                          [6.0, 5, 4, 2, 3, 1]])  # label 3: rank 5
    labels = [0, 1, 2, 3]
    probs, got = predict(LookupModel(table), batches(4, labels, 3))
    result = errors(probs, got)
    assert result == {"top1_error": 0.75, "top5_error": 0.25, "samples": 4}
    assert per_class_accuracy(probs, got) == {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}
    assert confused_pairs(probs, got)[0]["count"] == 1
    assert {(p["true"], p["predicted"]) for p in confused_pairs(probs, got)} == {(1, 2), (2, 0), (3, 0)}


def test_ten_crop_equals_the_mean_of_ten_separate_softmaxes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 7))
    views = torch.randn(5, 10, 3, 8, 8)
    averaged = view_probabilities(model, views)
    separate = torch.stack([torch.softmax(model(views[:, v]), dim=1) for v in range(10)]).mean(dim=0)
    assert torch.allclose(averaged, separate, atol=1e-7)
    assert not torch.allclose(averaged, torch.softmax(model(views[:, 0]), dim=1))


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(0)
    table = torch.randn(37, 1000)
    labels = torch.randint(0, 1000, (37,)).tolist()
    reference = predict(LookupModel(table), batches(37, labels, 37))
    for batch_size in (1, 5, 8, 36, 64):
        probs, got = predict(LookupModel(table), batches(37, labels, batch_size))
        assert torch.equal(got, reference[1]) and torch.allclose(probs, reference[0], atol=1e-7)
        assert errors(probs, got) == errors(*reference)
    ten = predict(LookupModel(table), batches(37, labels, 8, views=10))  # 10 identical views → same as one
    assert torch.allclose(ten[0], reference[0], atol=1e-6)


def test_predict_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(48, 3)).train()
    predict(model, batches(4, [0, 1, 2, 0], 2))
    assert model.training
