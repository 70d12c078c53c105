import pytest
import torch

from distill.evaluate import retrieval_metrics, zero_shot_metrics


def test_zero_shot_metrics_hand_computed():
    # 4 samples, 6 classes. Predictions (argmax): 0, 2, 2, 5; labels 0, 1, 2, 3.
    logits = torch.tensor([
        [9.0, 1, 0, 0, 0, 0],   # label 0: top-1 right
        [0.0, 5, 9, 0, 0, 0],   # label 1: second best -> top-5 right, top-1 wrong
        [0.0, 0, 9, 0, 0, 0],   # label 2: right
        [1.0, 2, 3, 0, 4, 9],   # label 3: ranked 6th of 6 -> wrong even at top-5
    ])
    labels = torch.tensor([0, 1, 2, 3])
    m = zero_shot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.5)
    assert m["top5"] == pytest.approx(0.75)
    assert m["num_classes"] == 6
    assert m["mean_per_class_recall"] == pytest.approx(0.5)  # recalls 1, 0, 1, 0 over the 4 present classes


def test_mean_per_class_recall_weights_classes_equally():
    logits = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0]])  # always predicts class 0
    labels = torch.tensor([0, 0, 0, 1])
    m = zero_shot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.75)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["top5"] == pytest.approx(1.0)  # k is clamped to the number of classes


def test_retrieval_metrics_hand_computed():
    image = torch.eye(3)
    # text 0 matches image 0; text 1 is closest to image 2; text 2 is closest to image 2.
    text = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0, 0, 1]])
    r = retrieval_metrics(image, text, ks=(1, 2))
    # image->text: image0 -> text0 first (hit); image1 -> text1 (0.6) is its best (hit); image2 -> text2 (1.0) hit
    assert r["image_to_text"]["R@1"] == pytest.approx(1.0)
    # text->image: text1's best image is image2 (0.8 > 0.6): miss at 1, hit at 2
    assert r["text_to_image"]["R@1"] == pytest.approx(2 / 3)
    assert r["text_to_image"]["R@2"] == pytest.approx(1.0)
