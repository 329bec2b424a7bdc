import numpy as np
import torch

from ion.data.transforms import prepare
from ion.inference.predict import predict_raw
from ion.modeling.build import build_detector
from ion.modeling.config import ContextConfig, ModelConfig
from ion.modeling.detector import IONDetector
from ion.ops.box_ops import clip_boxes_xyxy, decode_boxes

K = 3
WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def small_model(seed: int = 0) -> IONDetector:
    torch.manual_seed(seed)
    cfg = ModelConfig(width=0.125, context=ContextConfig(kind="none"), pool_from=("conv3", "conv4", "conv5"),
                      roi_op="roi_align", fc_dim=16)
    return build_detector(cfg, num_classes=K).double().eval()


@torch.no_grad()
def make_flip_symmetric(model: IONDetector) -> IONDetector:
    """Weights for which mirroring the image (and the ROIs) leaves every class
    score unchanged and negates dx: the exact case of the flip merge.

    Convolutions get left-right symmetric kernels; fc6's second half of units
    sees the mirrored 7x7 grid of its first half, so mirroring the input swaps
    the halves; fc7 commutes with that swap; the class scores and dy, dw, dh
    read both halves alike, dx reads their difference.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
    heads = model.heads
    D = heads.fc6.out_features
    h = D // 2
    C = heads.fc6.in_features // 49
    first = heads.fc6.weight[:h].view(h, C, 7, 7)
    heads.fc6.weight[h:] = first.flip(-1).reshape(h, -1)
    heads.fc6.bias.normal_(std=0.1)
    heads.fc6.bias[h:] = heads.fc6.bias[:h]
    p, q = heads.fc7.weight[:h, :h].clone(), heads.fc7.weight[:h, h:].clone()
    heads.fc7.weight.copy_(torch.cat([torch.cat([p, q], 1), torch.cat([q, p], 1)], 0))
    heads.fc7.bias[h:] = heads.fc7.bias[:h]
    heads.cls_score.weight.normal_(std=1.0)
    heads.cls_score.weight[:, h:] = heads.cls_score.weight[:, :h]
    heads.bbox_pred.weight.normal_(std=0.5)
    heads.bbox_pred.bias.normal_(std=0.5)
    w = heads.bbox_pred.weight.view(K, 4, D)
    dx, rest = w[:, 0], w[:, 1:]
    dx[:, h:] = -dx[:, :h]
    rest[:, :, h:] = rest[:, :, :h]
    heads.bbox_pred.bias.view(K, 4)[:, 0] = 0.0
    return model


def scene(height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    xy = rng.random((40, 2)) * [width * 0.7, height * 0.7]
    wh = 8 + rng.random((40, 2)) * [width * 0.4, height * 0.4]
    return image, np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_flip_merge_is_exact_for_a_flip_symmetric_model():
    model = make_flip_symmetric(small_model())
    image, proposals = scene(64, 96)  # min_size 64: no resize, width a multiple of the stride 16
    raw = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True, score_thresh=0.01)
    plain, flipped = raw["plain"], raw["flip"]
    assert set(np.unique(plain["round"])) == {1, 2}
    assert len(plain["scores"]) > 50
    assert np.array_equal(plain["labels"], flipped["labels"])
    assert np.array_equal(plain["round"], flipped["round"])
    np.testing.assert_allclose(flipped["scores"], plain["scores"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flipped["boxes"], plain["boxes"], rtol=1e-6, atol=1e-4)
    # The boxes really move (dx is not zero), so a dx left un-negated would show.
    assert np.abs(plain["boxes"][plain["round"] == 1] - proposals[0]).max() > 0.1


def test_flip_merge_changes_the_candidates_of_an_asymmetric_model():
    model = small_model()
    image, proposals = scene(64, 96)
    raw = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True, score_thresh=0.0)
    assert raw["plain"]["scores"].shape == raw["flip"]["scores"].shape
    assert not np.allclose(raw["plain"]["scores"], raw["flip"]["scores"])


@torch.no_grad()
def test_both_rounds_match_a_direct_computation_in_original_coordinates():
    model = small_model(seed=1)
    image, proposals = scene(50, 70, seed=2)
    raw = predict_raw(model, image, proposals, min_size=64, max_size=200, flip=False, score_thresh=0.05)
    assert set(raw) == {"plain"}
    got = raw["plain"]
    prepared = prepare(image, proposals, min_size=64, max_size=200, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225))
    h, w = prepared.image.shape[-2:]
    x, rois = prepared.image.double(), prepared.boxes.double()
    expected = {"boxes": [], "scores": [], "labels": []}
    for round_id in (1, 2):
        scores, deltas = model(x, rois)
        boxes = clip_boxes_xyxy(decode_boxes(deltas=deltas, rois=rois[:, None], weights=WEIGHTS), height=h, width=w)
        for p in range(len(rois)):
            for k in range(K):
                if scores[p, k + 1] >= 0.05:
                    expected["boxes"].append(clip_boxes_xyxy(boxes[p, k] / prepared.scale, height=50, width=70))
                    expected["scores"].append(scores[p, k + 1])
                    expected["labels"].append(k + 1)
        rois = boxes[torch.arange(len(rois)), scores[:, 1:].argmax(dim=1)]
        mask = got["round"] == round_id
        n = int(mask.sum())
        assert n > 0
        np.testing.assert_allclose(got["boxes"][mask], torch.stack(expected["boxes"][-n:]).numpy(), atol=1e-3)
        np.testing.assert_allclose(got["scores"][mask], torch.stack(expected["scores"][-n:]).numpy(), rtol=1e-5)
        assert got["labels"][mask].tolist() == expected["labels"][-n:]
    assert len(got["scores"]) == len(expected["scores"])
    assert got["boxes"].dtype == np.float32 and got["labels"].dtype == np.int64
    assert (got["boxes"][:, 2] <= 70).all() and (got["boxes"][:, 3] <= 50).all()


def test_no_proposals_gives_empty_candidates():
    model = small_model()
    image, _ = scene(64, 96)
    raw = predict_raw(model, image, np.zeros((0, 4), np.float32), min_size=64, max_size=96, flip=True)
    assert set(raw) == {"plain", "flip"}
    for cands in raw.values():
        assert cands["boxes"].shape == (0, 4) and cands["scores"].shape == (0,) and cands["labels"].shape == (0,)


def test_predict_raw_restores_training_mode():
    model = small_model().train()
    image, proposals = scene(64, 96)
    predict_raw(model, image, proposals[:3], min_size=64, max_size=96, flip=False)
    assert model.training


def test_one_round_is_the_first_round_of_two():
    model = small_model(seed=3)
    image, proposals = scene(64, 96, seed=4)
    both = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True)
    one = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True, two_rounds=False)
    for key in ("plain", "flip"):
        assert set(np.unique(one[key]["round"])) == {1}
        first = both[key]["round"] == 1
        for field in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(one[key][field], both[key][field][first])


@torch.no_grad()
def test_round_two_all_classes_rescores_every_class_box():
    """MR-CNN's iterative localisation: every round-1 candidate box is re-scored as its own ROI
    and keeps its class."""
    model = small_model(seed=1)
    image, proposals = scene(50, 70, seed=2)
    thresh = 0.05
    raw = predict_raw(model, image, proposals, min_size=64, max_size=200, flip=False, score_thresh=thresh,
                      round2="all_classes")["plain"]
    prepared = prepare(image, proposals, min_size=64, max_size=200, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225))
    h, w = prepared.image.shape[-2:]
    x, rois = prepared.image.double(), prepared.boxes.double()
    scores, deltas = model(x, rois)
    boxes = clip_boxes_xyxy(decode_boxes(deltas=deltas, rois=rois[:, None], weights=WEIGHTS), height=h, width=w)
    p_idx, k_idx = torch.nonzero(scores[:, 1:] >= thresh, as_tuple=True)
    rois2 = boxes[p_idx, k_idx]  # (M, 4): one ROI per round-1 candidate
    scores2, deltas2 = model(x, rois2)
    rows = torch.arange(len(rois2))
    boxes2 = clip_boxes_xyxy(decode_boxes(deltas=deltas2[rows, k_idx], rois=rois2, weights=WEIGHTS), height=h,
                             width=w)
    score2 = scores2[rows, k_idx + 1]
    keep = score2 >= thresh
    second = raw["round"] == 2
    assert int(second.sum()) == int(keep.sum()) > 0
    assert raw["labels"][second].tolist() == (k_idx[keep] + 1).tolist()
    np.testing.assert_allclose(raw["scores"][second], score2[keep].numpy(), rtol=1e-5)
    expected = clip_boxes_xyxy(boxes2[keep] / prepared.scale, height=50, width=70)
    np.testing.assert_allclose(raw["boxes"][second], expected.numpy(), atol=1e-3)
    # Round 1 is the same whichever boxes round 2 re-scores.
    top = predict_raw(model, image, proposals, min_size=64, max_size=200, flip=False, score_thresh=thresh)["plain"]
    first = raw["round"] == 1
    assert np.array_equal(raw["boxes"][first], top["boxes"][top["round"] == 1])


def test_bf16_autocast_runs_on_the_cpu_and_decodes_in_float32():
    """detect.amp's path, here on the CPU (the GPU is where it is used): the
    network runs under bf16 autocast, the candidates come out float32 with the
    same layout as fp32's. Agreement of the final detections is not asserted:
    with untrained weights the top-100 scores lie within 0.01 of one another,
    where bf16's rounding reorders them."""
    model = small_model().float()
    image, proposals = scene(64, 96)
    raw = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True, score_thresh=0.0, amp="bf16")
    reference = predict_raw(model, image, proposals, min_size=64, max_size=96, flip=True, score_thresh=0.0)
    for name in ("plain", "flip"):
        got, want = raw[name], reference[name]
        assert got["boxes"].dtype == np.float32 and got["scores"].dtype == np.float32
        assert got["boxes"].shape == want["boxes"].shape  # score_thresh 0: every (proposal, class) pair
        assert np.isfinite(got["boxes"]).all() and np.isfinite(got["scores"]).all()
