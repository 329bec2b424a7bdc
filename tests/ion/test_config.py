import pytest

from ion.modeling.config import ContextConfig, InputConfig, ModelConfig, RoiSamplingConfig


def test_defaults_are_the_papers_model():
    cfg = ModelConfig()
    assert cfg.width == 1.0 and cfg.pool_from == ("conv3", "conv4", "conv5", "context")
    assert cfg.norm == "blob" and cfg.scale_mode == "learned" and cfg.context.kind == "irnn"
    assert cfg.sampling.rois_per_image == 128 and cfg.input.min_size == 600


@pytest.mark.parametrize("kwargs,message", [
    (dict(pool_from=("conv3", "fc6")), "choose one or more"),
    (dict(pool_from=("conv3", "conv3")), "twice"),
    (dict(pool_from=("conv5", "conv7")), "conv67 is false"),
    (dict(context=ContextConfig(kind="none")), "context.kind is none"),
    (dict(context=ContextConfig(kind="none"), pool_from=("conv5",), seg_loss_weight=1.0), "needs a context"),
    (dict(pool_from=("conv5",)), "nothing reads it"),
    (dict(bbox_weights=(10.0, 10.0, 5.0)), "bbox_weights"),
    (dict(imagenet_weights="vgg16.pth", width=0.25), "width 1.0"),
    (dict(imagenet_weights="vgg16.pth", fc_dim=1024), "fc_dim 4096"),
    (dict(block_convs=(1, 1, 1, 1)), "block_convs"),
    (dict(block_convs=(1, 1, 0, 1, 1)), "block_convs"),
    (dict(fuse=True, norm="blob"), "norm"),
    (dict(imagenet_weights="vgg16.pth", block_convs=(1, 1, 1, 1, 1)), "block_convs"),
    (dict(width=0.25, context=ContextConfig(hidden=64, input_init="identity")),
     r"context.hidden: 64: .* conv5's channels \(128 at width 0.25\); set context.hidden to 128"),
])
def test_cross_field_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_section_rules():
    with pytest.raises(ValueError, match="max_size"):
        InputConfig(min_size=600, max_size=500)
    with pytest.raises(ValueError, match="3 values"):
        InputConfig(pixel_mean=(0.5,))
    with pytest.raises(ValueError, match="bg_iou_lo < bg_iou_hi <= fg_iou"):
        RoiSamplingConfig(bg_iou_lo=0.5, bg_iou_hi=0.4)


def test_identity_input_init_with_conv5_wide_hidden_is_accepted():
    assert ModelConfig(width=0.25, context=ContextConfig(hidden=128, input_init="identity")).context.hidden == 128
    assert ModelConfig(context=ContextConfig(hidden=512, input_init="identity")).width == 1.0


def test_seg_only_context_is_allowed():
    cfg = ModelConfig(pool_from=("conv3", "conv4", "conv5"), seg_loss_weight=1.0)
    assert cfg.context.kind == "irnn"


def test_fuse_and_block_convs_are_accepted_with_valid_settings():
    cfg = ModelConfig(fuse=True, norm="channel", block_convs=(1, 1, 1, 1, 1))
    assert cfg.fuse and cfg.block_convs == (1, 1, 1, 1, 1)
    assert ModelConfig().block_convs == (2, 2, 3, 3, 3) and not ModelConfig().fuse
