"""pipeline/commands/predict_images.py without a trained model: what the predictor is made of."""
from __future__ import annotations

import pytest

from ion.errors import UserError
from pipeline.commands.predict_images import make_predictor
from pipeline.config import load_config


def test_mcg_in_the_test_mix_is_left_out_and_said(tmp_path):
    cfg = load_config("coco_ion_competition", workdir=tmp_path)  # test mix: 1000 RPN2 + 2000 MCG
    rpn = tmp_path / "rpn.pt"
    rpn.write_bytes(b"weights")
    predictor, notes = make_predictor(cfg, model_dir=tmp_path, rpn_weights=rpn, best=None)
    assert predictor.mix == (("rpn2", 1000),)
    assert any("mcg" in note and "rpn2 1000" in note for note in notes)
    assert predictor.thresholds == {"nms_iou": cfg.tune.baseline_nms_iou, "vote_iou": None, "score_thresh": 0.05,
                                    "max_dets": 100}


def test_a_test_mix_of_mcg_only_is_a_user_error(tmp_path):
    cfg = load_config("coco_ion", ["proposals.mix.test={bottom_up: 2000}"], workdir=tmp_path)
    with pytest.raises(UserError, match="cannot be computed for new images"):
        make_predictor(cfg, model_dir=tmp_path, rpn_weights=None, best=None)


def test_tuned_thresholds_are_used_when_there_are(tmp_path):
    cfg = load_config("smoke", workdir=tmp_path)
    rpn = tmp_path / "rpn.pt"
    rpn.write_bytes(b"weights")
    best = {"nms_iou": 0.44, "vote_iou": 0.85, "score_thresh": 0.05, "max_dets": 100, "AP": 0.5}
    predictor, notes = make_predictor(cfg, model_dir=tmp_path, rpn_weights=rpn, best=best)
    assert predictor.thresholds == {"nms_iou": 0.44, "vote_iou": 0.85, "score_thresh": 0.05, "max_dets": 100}
    assert predictor.mix == tuple(cfg.proposals.resolve_mix("test").items()) and notes == []
