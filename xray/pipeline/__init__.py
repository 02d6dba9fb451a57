"""The orchestrator that chains the stages into one run."""
