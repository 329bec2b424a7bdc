"""The ION detector as nn.Modules: VGG16 backbone, skip pooling, the IRNN
context module, heads, segmentation head, losses, ROI sampling, and the
factory `build_detector` that reads ModelConfig (Sec. 3)."""
