"""From a trained detector to final detections: the raw per-proposal pass with
flip and two box-regression rounds (predict), NMS and weighted voting
(postprocess), and the thresholds tuned on minival (tuning)."""
