"""`python -m pipeline plan`: the preflight (every input the selected stages read, the cluster's
resources, the MLflow store, free disk) and the estimate of each stage's time, GPU-hours, disk and
peak memory from a calibration recorded by earlier runs on the same device kind, or measured on
demand by running the config on two small samples (`plan --calibrate`, calibrate.py)."""
