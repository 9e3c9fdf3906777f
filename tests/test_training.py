"""face-train on CPU: small backbones, small crops, real faces from ../shared/data."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from data.images import load_image
from embedder import FacePipeline
from embedder.nets import CheckpointError, create_backbone
from embedder.registry import create
from tests.conftest import CELEBA, PHOTOS
from training.augment import draw_sunglasses
from training.embedder import EmbedderSettings, embed_crops, separation, template_for, train_embedder
from training.heads import ArcFaceHead
from training.losses import wing_loss
from training.samples import aligned_crops, read_labels

os.environ.setdefault("YOLO_OFFLINE", "1")
ARCH = "resnet10t"  # timm's smallest ResNet: quick on CPU


def test_wing_loss_formula_and_continuity():
    w, eps = 0.04, 0.008
    c = w - w * math.log(1 + w / eps)
    for x in (0.0, 0.001, 0.02, 0.039, 0.05, 0.3):
        expected = w * math.log(1 + x / eps) if x < w else x - c
        got = float(wing_loss(torch.tensor([x]), torch.tensor([0.0]), w, eps))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert float(wing_loss(torch.tensor([-x]), torch.tensor([0.0]), w, eps)) == pytest.approx(got, abs=1e-7)
    below = float(wing_loss(torch.tensor([w - 1e-7]), torch.tensor([0.0]), w, eps))
    above = float(wing_loss(torch.tensor([w + 1e-7]), torch.tensor([0.0]), w, eps))
    assert abs(above - below) < 1e-5  # continuous at |x| = w
    with pytest.raises(ValueError):
        wing_loss(torch.zeros(1), torch.zeros(1), 0.0, eps)


def test_arcface_margin_applies_to_the_true_class_only():
    head = ArcFaceHead(dim=4, classes=3, s=10.0, m=0.5).requires_grad_(False)
    e = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    plain, margin = head(e), head(e, labels)
    cos = plain / 10.0
    for i, y in enumerate(labels):
        theta = torch.acos(cos[i, y].clamp(-1, 1))
        expected = torch.cos(theta + 0.5) if theta + 0.5 < math.pi else cos[i, y] - math.sin(math.pi - 0.5) * 0.5
        assert float(margin[i, y]) == pytest.approx(10 * float(expected), abs=1e-4)
        others = [c for c in range(3) if c != y]
        assert torch.allclose(margin[i, others], plain[i, others])


@pytest.fixture(scope="module")
def celeba20(tmp_path_factory):
    """Labels of 20 CelebA test identities, 8 images each, made with face-train label (real pipeline)."""
    from data.readers import read_celeba
    from training.samples import label_dataset

    listing = read_celeba(CELEBA, split="test")
    by_id: dict[str, list[str]] = {}
    for r in listing.records:
        if not r.path.startswith("img_align_celeba/0000"):
            by_id.setdefault(r.identity, []).append(r.path)
    chosen = sorted((i for i, paths in by_id.items() if len(paths) >= 8), key=lambda i: int(i))[:20]
    root = tmp_path_factory.mktemp("celeba20")
    for identity in chosen:
        (root / identity).mkdir()
        for rel in by_id[identity][:8]:
            (root / identity / rel.split("/")[-1]).symlink_to(CELEBA / rel)
    labels = label_dataset(str(root), "folders", tmp_path_factory.mktemp("labels") / "celeba20", workers=2)
    return labels


@pytest.mark.needs_data
def test_sunglasses_land_on_the_eyes(celeba20):
    template = template_for(112)
    crops, _ = aligned_crops(read_labels(celeba20)[:6], template)
    (lx, ly), (rx, ry) = template.points[0], template.points[1]
    (mx1, my1), (mx2, my2) = template.points[3], template.points[4]
    rng = np.random.default_rng(0)
    for crop in crops:
        glasses = draw_sunglasses(crop, (lx, ly), (rx, ry), rng).astype(float)
        diff = crop.astype(float) - glasses  # darkening
        for x, y in ((lx, ly), (rx, ry)):  # the lenses are on the eyes: dark, and drawn over what was there
            region = (slice(int(y) - 3, int(y) + 4), slice(int(x) - 3, int(x) + 4))
            assert glasses[region].mean() < 50
            assert (np.abs(diff[region]).max(axis=2) > 2).mean() > 0.8
        mouth = np.abs(diff[int(my1) - 3:int(my2) + 4, int(mx1):int(mx2)]).mean()
        assert mouth < 1.0  # and nowhere near the mouth


@pytest.mark.needs_data
def test_embedder_trains_separates_and_loads_as_backend(celeba20, tmp_path):
    settings = EmbedderSettings(arch=ARCH, dim=64, size=64, epochs=8, ce_epochs=3, batch_size=32, lr=3e-3, arcface_s=16,
                                arcface_m=0.3, val_identities=4, heavy_augment=False, sunglasses=0.2, seed=0)
    out = tmp_path / "run"
    result = train_embedder(str(celeba20), str(out), settings, device="cpu")
    history = result.history
    assert [h["stage"] for h in history] == ["cross-entropy"] * 3 + ["arcface"] * 5
    assert history[2]["train_loss"] < history[0]["train_loss"] and history[-1]["train_loss"] < history[3]["train_loss"]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert (out / "learning_curve.png").is_file() and (out / "history.json").is_file()
    assert 0 <= history[-1]["val"]["tpr"] <= 1 and -1 <= history[-1]["val"]["threshold"] <= 1

    # Separation of the 16 training identities, before and after, on plain (unaugmented) crops.
    samples = read_labels(celeba20)
    template = template_for(64)
    crops, kept = aligned_crops(samples, template)
    labels = np.array([s.identity for s in kept])
    from embedder.nets import Preprocess, build_from_checkpoint, embedding_net, load_checkpoint

    ckpt = load_checkpoint(out / "embedder-last.pt", "embedder")
    torch.manual_seed(settings.seed)
    initial = separation(embed_crops(embedding_net(ARCH, 64), crops, ckpt.preprocess, "cpu"), labels)
    trained = separation(embed_crops(build_from_checkpoint(ckpt), crops, ckpt.preprocess, "cpu"), labels)
    # measured: AUC 0.607 -> 0.726, mean same-minus-different cosine gap 0.004 -> 0.328
    assert trained["auc"] > initial["auc"] + 0.06, (initial, trained)
    assert trained["gap"] > initial["gap"] + 0.15, (initial, trained)

    # Resume extends the same run: one more epoch, the history before it kept.
    resumed = train_embedder(str(celeba20), str(out), EmbedderSettings(**{**settings.__dict__, "epochs": 9}),
                             device="cpu", resume=True)
    assert len(resumed.history) == 9 and resumed.history[:8] == history

    # The checkpoint is a backend: its template, size and normalisation come from it.
    pipeline = FacePipeline(embedder="timm-arcface", embedder_options={"checkpoint": str(result.checkpoint)})
    assert pipeline.embedder.crop.size == (64, 64) and pipeline.dim == 64
    faces = pipeline(load_image(PHOTOS / "group1.jpg"))
    assert len(faces) == 3
    for face in faces:
        assert face.embedding.shape == (64,) and abs(float(np.linalg.norm(face.embedding)) - 1) < 1e-5

    # ... of the indexer and of search: the gallery records the checkpoint, and queries use it.
    from embedder.pipeline import PipelineConfig
    from indexer import RunConfig, run_index
    from search import Searcher

    config = RunConfig(dataset_root=str(PHOTOS), format="folder", pipeline=PipelineConfig(
        embedder="timm-arcface", embedder_options={"checkpoint": str(result.checkpoint)}))
    run_index(config, tmp_path / "gallery", workers=0, progress=False)
    searcher = Searcher(tmp_path / "gallery")
    assert searcher.gallery.dim == 64
    top = searcher.search(load_image(PHOTOS / "group2.jpg"), k=1)[0].matches[0]
    assert top.path == "group2.jpg" and top.cosine > 0.999


@pytest.mark.needs_data
def test_embedder_resume_continues(celeba20, tmp_path):
    base = dict(arch=ARCH, dim=32, size=48, ce_epochs=0, batch_size=32, val_identities=4, heavy_augment=False,
                max_steps_per_epoch=2)
    out = tmp_path / "run"
    train_embedder(str(celeba20), str(out), EmbedderSettings(epochs=1, **base), device="cpu")
    with pytest.raises(ValueError, match="other settings"):
        train_embedder(str(celeba20), str(out), EmbedderSettings(epochs=2, **{**base, "dim": 16}), device="cpu", resume=True)


@pytest.mark.needs_data
def test_landmarks_train_and_load_as_backend(celeba20, tmp_path):
    from training.landmarks import train_landmarks

    result = train_landmarks(str(celeba20), str(tmp_path / "lm"), arch=ARCH, size=64, epochs=4, batch_size=16, lr=2e-3,
                             device="cpu")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    assert result.best_nme < 1.0 and (tmp_path / "lm" / "learning_curve.png").is_file()
    with pytest.raises(ValueError, match="dlib5"):  # dlib's chip needs dlib-5 keypoints: said clearly
        FacePipeline(landmarks="timm-landmarks", landmarks_options={"checkpoint": str(result.checkpoint)})
    landmarker = create("landmarks", "timm-landmarks", checkpoint=str(result.checkpoint))
    image = load_image(PHOTOS / "group1.jpg")
    detections = FacePipeline().detector.detect(image)
    landmarked = landmarker.landmarks(image, detections)
    for det in landmarked:
        assert det.landmarks.shape == (5, 2) and np.isfinite(det.landmarks).all()
        x1, y1, x2, y2 = det.box
        side = max(x2 - x1, y2 - y1)
        assert ((det.landmarks[:, 0] > x1 - side) & (det.landmarks[:, 0] < x2 + side)).all()


def test_offline_pretrained_and_init(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="--init"):
        create_backbone(ARCH, num_classes=0, pretrained=True)
    model = create_backbone(ARCH, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    again = create_backbone(ARCH, num_classes=0, init=str(tmp_path / "weights.pth"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="unknown timm architecture"):
        create_backbone("no-such-net", num_classes=0)


def test_onnx_arcface_backend(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(3, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["683"])],
        "arcface-like", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor("W", TensorProto.FLOAT, weight.shape, weight.flatten())])
    path = tmp_path / "w600k_like.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    backend = create("embedder", "onnx-arcface", model=str(path))
    crops = rng.integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    out = backend.embed(crops)
    assert out.shape == (3, 16) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    x = (crops.astype(np.float32) - 127.5) / 127.5  # insightface's normalisation, RGB order
    expected = x.mean(axis=(1, 2)) @ weight
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(out, expected, atol=1e-4)
    from embedder.backends.base import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="insightface"):
        create("embedder", "onnx-arcface", model=str(tmp_path / "missing.onnx"))


@pytest.mark.needs_data
def test_yolo_conversion_labels_fall_on_faces(celeba_gallery, tmp_path):
    from training.yolo import write_yolo_dataset

    samples = read_labels(celeba_gallery[0], largest_only=False)[:40]
    dataset = write_yolo_dataset(samples, tmp_path / "yolo", val_fraction=0.25)
    assert dataset.train_images + dataset.val_images == len({s.path for s in samples})
    text = dataset.data_yaml.read_text()
    assert "kpt_shape: [5, 3]" in text and "flip_idx: [1, 0, 2, 4, 3]" in text
    detector = FacePipeline().detector
    checked = 0
    for label in sorted((tmp_path / "yolo" / "labels").rglob("*.txt")):
        image_path = next((tmp_path / "yolo" / "images" / label.parent.name).glob(label.stem + ".*"))
        image = load_image(image_path)
        h, w = image.shape[:2]
        for line in label.read_text().splitlines():
            v = np.array(line.split()[1:], float)
            cx, cy, bw, bh = v[:4] * [w, h, w, h]
            box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
            points = v[4:].reshape(5, 3)
            xy = points[:, :2] * [w, h]
            visible = points[:, 2] == 2
            assert visible.sum() >= 4
            assert ((xy[visible, 0] >= box[0]) & (xy[visible, 0] <= box[2]) & (xy[visible, 1] >= box[1])
                    & (xy[visible, 1] <= box[3])).all()  # the keypoints lie in the face box
            assert xy[0, 0] < xy[1, 0] and xy[3, 0] < xy[4, 0]  # left before right, as seen
            # An independent detector run on the linked image finds a face where the label says.
            found = detector.detect(image)
            ious = [_iou(box, np.array(d.box)) for d in found]
            assert found and max(ious) > 0.6, (label, ious)
            checked += 1
    assert checked >= 38


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = np.maximum(a[:2], b[:2])
    x2, y2 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.needs_data
def test_yolo_trains_and_loads_as_backend(celeba_gallery, tmp_path):
    import csv

    from training.yolo import train_yolo, write_yolo_dataset

    samples = read_labels(celeba_gallery[0], largest_only=False)[:48]
    dataset = write_yolo_dataset(samples, tmp_path / "data", val_fraction=0.2)
    weights = train_yolo(dataset.data_yaml, tmp_path / "train", epochs=5, imgsz=128, batch=8, workers=0)
    rows = list(csv.DictReader(open(tmp_path / "train" / "results.csv")))
    total = [sum(float(r[k]) for k in r if k.strip().startswith("train/")) for r in rows]
    assert len(rows) == 5 and total[-1] < total[0], total
    backend = create("detector", "yolo", weights=str(weights), conf=0.001, imgsz=128)
    detections = backend.detect(load_image(samples[0].path))
    assert detections, "a low confidence threshold gives candidate boxes even after 5 short epochs"
    for d in detections:
        assert len(d.box) == 4 and 0 <= d.score <= 1 and d.landmarks.shape == (5, 2)
    with pytest.raises(ValueError, match="dlib5"):  # dlib's network needs dlib-5 keypoints: said clearly
        FacePipeline(detector="yolo", detector_options={"weights": str(weights)}, landmarks="from-detector")


@pytest.mark.needs_data
def test_celeba_wild_annotations_convert(tmp_path):
    """The official in-the-wild files (count line, header, column spacing) become YOLO labels."""
    from training.yolo import celeba_wild_samples, has_celeba_wild, write_yolo_dataset

    root = tmp_path / "celeba"
    (root / "Anno").mkdir(parents=True)
    (root / "img_celeba").mkdir()
    pipeline = FacePipeline()
    bbox, marks = ["2", "image_id x_1 y_1 width height"], ["2", "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                                                                "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"]
    for name in ("000001.jpg", "000002.jpg"):
        (root / "img_celeba" / name).symlink_to(CELEBA / "img_align_celeba" / name)
        det = pipeline.detect(load_image(CELEBA / "img_align_celeba" / name))[0]
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        bbox.append(f"{name}    {x1:>3} {y1:>3} {x2 - x1:>3} {y2 - y1:>3}")
        marks.append(f"{name} " + "  ".join(f"{int(round(v)):>3}" for v in det.landmarks.flatten()))
    (root / "Anno" / "list_bbox_celeba.txt").write_text("\r\n".join(bbox) + "\r\n")
    (root / "Anno" / "list_landmarks_celeba.txt").write_text("\r\n".join(marks) + "\r\n")
    assert has_celeba_wild(root) and not has_celeba_wild(CELEBA)
    samples = celeba_wild_samples(root)
    assert [s.width for s in samples] == [178, 178] and samples[0].landmarks.shape == (5, 2)
    dataset = write_yolo_dataset(samples, tmp_path / "yolo", val_fraction=0.5)
    lines = [p.read_text().split() for p in (tmp_path / "yolo" / "labels").rglob("*.txt")]
    assert len(lines) == 2 and all(len(line) == 1 + 4 + 15 for line in lines)
    from training.yolo import DetectorDataError

    with pytest.raises(DetectorDataError, match="face-train label"):
        celeba_wild_samples(CELEBA)
