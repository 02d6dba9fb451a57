"""Entry point: ``uvicorn app:app``. Settings come from the environment (see ``xray.api.settings``)."""

import logging
import os

from xray.api.factory import create_app
from xray.api.settings import AppSettings

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app(AppSettings.from_env())
