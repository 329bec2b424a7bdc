"""Low-level tensor ops with no learned state: box conversions, IoU and
encodings (box_ops), ROI align on the CPU (roi_align)."""
