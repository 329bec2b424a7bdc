"""COCO box evaluation: pycocotools as the reference (coco_eval.py), a faster
evaluator equal to it for the tune loop (evaluator.py), the shared metrics
record (metrics.py), and the results files for the COCO server (results.py)."""
