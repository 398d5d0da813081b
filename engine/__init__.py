"""Compute core of the DR grading app. Nothing here imports streamlit, so every piece runs from
the command line, a job or a test.

Five groups, each importing only from the groups above it in this list (and from db/ and
grades.py):
- runtime: where work runs and what it writes to (the workspace folder, background jobs,
  torchrun's ranks, text made safe for Markdown)
- data: photographs in (safe reading, the eye crop, datasets and loaders, importers, uploads,
  the synthetic generator, Deep Zoom tiles, labelled sets written out as folders)
- model: networks and what they predict (creation and checkpoints, the seed's weights,
  prediction with test-time views, onnxruntime, metrics, calibration, Grad-CAM, inference
  over a pool)
- training: the training loop, the refit on every labelled image, the train command, a run's
  screening figures and its model card
- loop: the curation loop around the model (retrain settings, the loop-gain experiment, queue
  order, reader agreement, model export and import, the demo workspace)
"""
