"""MLflow models logged before the pipeline was arranged by concern pickled their
PythonModel as pipeline.mlflow_model.IonDetectorModel: that name still loads."""
import pickle

import pipeline.tracking.model as model_module


def test_a_pickle_naming_the_old_module_loads_the_current_class():
    # GLOBAL opcode: what cloudpickle writes for a class it pickles by reference.
    old = b"\x80\x04cpipeline.mlflow_model\nIonDetectorModel\n."
    assert pickle.loads(old) is model_module.IonDetectorModel


def test_an_instance_pickled_under_the_old_name_is_the_current_class():
    payload = pickle.dumps(model_module.IonDetectorModel(), protocol=2)  # names as GLOBAL text lines
    old = payload.replace(b"pipeline.tracking.model", b"pipeline.mlflow_model")
    assert old != payload
    assert type(pickle.loads(old)) is model_module.IonDetectorModel
