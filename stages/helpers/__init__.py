"""What several stages share but is not a stage: the worker-side model cache,
resuming a worker from its checkpoint, the raw-detections file format, and the
proposals stage's RPN training."""
