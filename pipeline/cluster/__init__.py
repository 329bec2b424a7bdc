"""The Ray adapter, with pipeline/tracking/ the only code that imports ray or
mlflow: Ray tasks for the stages' work (tasks.py) and Ray Train for training (train.py)."""
