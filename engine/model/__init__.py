"""Networks and what they predict: creation, offline weights and checkpoints, the seed's weight
layout, prediction with test-time views, onnxruntime on a CPU, metrics, calibration, Grad-CAM,
and inference over a pool (engine.model.infer). Imports engine.data and engine.runtime."""
