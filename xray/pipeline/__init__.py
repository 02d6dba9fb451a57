"""The pipeline: the run store, the stage contract, run ids and the orchestrator.

``store`` writes and reads run directories and artifacts; ``stage`` is the one
shape every stage has; ``training_pipeline`` chains the five stages into a run.
The orchestrator may import every stage and what they import (it ends a run
through ``xray.audit``, which seals it); ``store``, ``stage`` and ``run_ids``
import only ``xray.entity`` and the global modules.
"""
