"""Versions serving must refuse, and the reason /status gives for each. Their code writes
a marker file whenever it runs, so a test can tell that it never did:

    _load_pyfunc     a loader_module of its own (MLmodel: loader_module: refused_models)
    Pickled          a PythonModel that writes the marker when it is unpickled
    (the other kinds run conftest's stand-in, configured to write the marker)
"""

from pathlib import Path

import mlflow

REFUSED_KINDS = {
    "unsigned": "it is not signed",
    "other-key": "its signature does not verify with this stack's public key",
    "altered-code": "its files differ from the files that were signed",
    "other-model": "it was signed for another model version",
    "pickled": "it holds a pickled Python model, which this stack does not load",
    "other-loader": "it asks for a loader that this stack does not run",
}


def write_marker(path):
    Path(path).write_text("the code of a refused model ran\n")
    return None


def _load_pyfunc(data_path):
    write_marker(Path(data_path).read_text().strip())
    raise RuntimeError("marker_loader is not a model")


class Pickled(mlflow.pyfunc.PythonModel):
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (write_marker, (self.marker,))

    def predict(self, context, model_input, params=None):
        return model_input
