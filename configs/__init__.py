"""The shipped run configs (YAML), installed with the package so that
`python -m pipeline run --config smoke` works from any directory."""
