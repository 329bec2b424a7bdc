"""The artifact cache: the store of stage outputs (store.py), what keys them
(fingerprint.py: code and input fingerprints), what changed since an output
(changes.py), what `status` reports (status.py) and what `gc` deletes (gc.py)."""
