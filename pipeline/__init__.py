"""The ION pipeline's driver side: the command line, the stage graph and runner,
and the adapters to MLflow (tracking/), Ray (cluster/) and the artifact cache (cache/)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

# The checkout (or site-packages) holding ion/, proposals/, stages/, pipeline/ and configs/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# A logged MLflow model pickles its PythonModel by module path: models logged
# before the pipeline was arranged by concern name pipeline.mlflow_model.
MOVED_MODULES = {"pipeline.mlflow_model": "pipeline.tracking.model"}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's old name as the very module at its new name (one class object)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModule())
