"""Training: the loop (trainer), the refit that lets every labelled image reach the final model,
the train command, a run's screening figures and its model card. Imports engine.model,
engine.data and engine.runtime."""
