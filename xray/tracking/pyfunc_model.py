"""The exported model as an MLflow pyfunc: encoded images in, the same answers as the Bento out.

It wraps the same model directory and loader as serving (``xray.serving.serving_model``)
and answers through the one predict path (``xray.serving.predict``): the same
decode, input checks, OOD score and calibrated probabilities, so MLflow and the
Bento cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
REFUSED_COLUMN = "refused"
REASONS_COLUMN = "reasons"  # JSON list of {code, message}: why refused ("[]" when accepted)
WARNINGS_COLUMN = "warnings"  # JSON list of {code, message}: checks answered as warnings
OOD_SCORE_COLUMN = "ood_score"  # NaN where the model ships no OOD score
OOD_THRESHOLD_COLUMN = "ood_threshold"


def probability_column(class_name: str) -> str:
    return f"probability_{class_name}"


def output_columns(class_names: tuple[str, ...] | list[str]) -> list[str]:
    return [LABEL_COLUMN, REFUSED_COLUMN, REASONS_COLUMN, WARNINGS_COLUMN, OOD_SCORE_COLUMN, OOD_THRESHOLD_COLUMN,
            *(probability_column(n) for n in class_names)]


class XrayPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a binary ``image`` column (PNG, JPEG or DICOM bytes). Output per row: ``label``
    (empty when refused), ``refused``, ``reasons``, ``warnings``, ``ood_score``, ``ood_threshold`` and one
    ``probability_<class>`` column per class (NaN when refused). An undecodable image is refused with
    reason code ``unreadable``."""

    def load_context(self, context: Any) -> None:
        from xray.serving.predict import Policy
        from xray.serving.serving_model import load_model_dir

        self.loaded = load_model_dir(Path(context.artifacts["model_dir"]), precision="fp32")
        self.policy = Policy.for_model(self.loaded.spec)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from xray.serving.predict import predict

        answers = predict(self.loaded, [bytes(data) for data in model_input[IMAGE_COLUMN]], self.policy)
        names = list(self.loaded.spec.class_names)
        return pd.DataFrame([_row(answer, names) for answer in answers], columns=output_columns(names))


def _row(answer: Any, names: list[str]) -> dict[str, Any]:
    from xray.serving.predict import Prediction, Refusal

    def reasons(items: Any) -> str:
        return json.dumps([{"code": r.code, "message": r.message} for r in items])

    if isinstance(answer, Exception):
        return {LABEL_COLUMN: "", REFUSED_COLUMN: True, WARNINGS_COLUMN: "[]", OOD_SCORE_COLUMN: np.nan,
                OOD_THRESHOLD_COLUMN: np.nan, REASONS_COLUMN: json.dumps([{"code": "unreadable", "message": str(answer)}]),
                **{probability_column(n): np.nan for n in names}}
    row = {
        REFUSED_COLUMN: isinstance(answer, Refusal), WARNINGS_COLUMN: reasons(answer.warnings),
        OOD_SCORE_COLUMN: np.nan if answer.ood_score is None else answer.ood_score,
        OOD_THRESHOLD_COLUMN: np.nan if answer.ood_threshold is None else answer.ood_threshold,
    }
    if isinstance(answer, Prediction):
        return {**row, LABEL_COLUMN: answer.label, REASONS_COLUMN: "[]",
                **{probability_column(n): float(answer.probabilities[n]) for n in names}}
    return {**row, LABEL_COLUMN: "", REASONS_COLUMN: reasons(answer.reasons), **{probability_column(n): np.nan for n in names}}
