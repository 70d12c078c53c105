"""Our zero-shot and retrieval numbers agree with CLIP_benchmark's on the same model and data (within 0.5 point)."""

import pytest
import torch
from clip_benchmark.datasets import builder as cb_builder
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

from distill.evaluate import evaluate_model
from distill.teacher_training import TeacherTrainConfig, train_teacher
from mdmodels import load_model
from tests.conftest import write_shapes_root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = write_shapes_root(tmp_path_factory.mktemp("data") / "shapes", per_pair=4)
    model_dir = tmp_path_factory.mktemp("models") / "teacher"
    train_teacher("md-student-tiny", str(root), model_dir,
                  TeacherTrainConfig(steps=25, batch_size=24, warmup_steps=3, lr=2e-3), progress=False)
    return root, load_model(f"local-dir:{model_dir}")


def _accuracy_numpy2(output, target, topk=(1,)):
    """CLIP_benchmark's `accuracy`, with the one change numpy 2 needs (`float()` of a 1-element array fails)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zero_shot_and_retrieval_match_clip_benchmark(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy_numpy2)
    root, loaded = trained
    ours = evaluate_model(loaded, root, "test", progress=False)

    dataset = cb_builder.build_dataset("wds/shapes", root=str(root), split="test", transform=loaded.preprocess)
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None)
    theirs = zeroshot_classification.evaluate(loaded.model, loader, loaded.tokenizer, dataset.classes,
                                              dataset.templates, "cpu", amp=False)
    assert ours["zeroshot"]["top1"] == pytest.approx(theirs["acc1"], abs=0.005)
    assert ours["zeroshot"]["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=0.005)

    # CLIP_benchmark reads retrieval from a root marked `dataset_type.txt = retrieval`: same shards, linked.
    retrieval_root = tmp_path / "retrieval"
    retrieval_root.mkdir()
    (retrieval_root / "test").symlink_to(root / "test")
    (retrieval_root / "dataset_type.txt").write_text("retrieval\n")
    dataset = cb_builder.build_dataset("wds/shapes", root=str(retrieval_root), split="test",
                                       transform=loaded.preprocess, task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset.batched(8, collation_fn=lambda b: (
        torch.stack([x for x, _ in b]), [t for _, t in b])), batch_size=None)
    theirs = zeroshot_retrieval.evaluate(loaded.model, loader, loaded.tokenizer, "cpu", amp=False,
                                         recall_k_list=[1, 5])
    for k in (1, 5):
        assert ours["retrieval"]["text_to_image"][f"R@{k}"] == pytest.approx(
            theirs[f"image_retrieval_recall@{k}"], abs=0.005)
        assert ours["retrieval"]["image_to_text"][f"R@{k}"] == pytest.approx(
            theirs[f"text_retrieval_recall@{k}"], abs=0.005)
