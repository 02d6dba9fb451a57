"""The exported model as an MLflow pyfunc: encoded images in, labels and probabilities out.

It wraps the same model directory and loader as serving (``xray.serving.serving_model``)
and decodes with the same ``xray.data.preprocessing``, so MLflow and the Bento
cannot disagree on preprocessing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"


def probability_column(class_name: str) -> str:
    return f"probability_{class_name}"


class XrayPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a binary ``image`` column (PNG or JPEG bytes). Output: label + one
    ``probability_<class>`` column per class."""

    def load_context(self, context: Any) -> None:
        from xray.serving.serving_model import load_model_dir

        self.loaded = load_model_dir(Path(context.artifacts["model_dir"]), precision="fp32")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from xray.data.preprocessing import load_pixels

        size = self.loaded.spec.preprocessing.image_size
        pixels = np.stack([load_pixels(bytes(data), size) for data in model_input[IMAGE_COLUMN]])
        probabilities = self.loaded.predict_proba(pixels)
        names = list(self.loaded.spec.class_names)
        out = pd.DataFrame({probability_column(n): probabilities[:, i].astype(np.float64) for i, n in enumerate(names)})
        out.insert(0, LABEL_COLUMN, [names[i] for i in probabilities.argmax(axis=1)])
        return out
