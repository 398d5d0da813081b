"""Compute core of the DR grading app: data, preprocessing, models, training, inference.

Nothing here imports streamlit, so every piece runs from the command line, a job or a test.
"""
