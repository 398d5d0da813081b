"""Photographs in: safe reading, the eye crop and its cache, datasets and loaders, the dataset
importers and uploads, the synthetic generator, Deep Zoom tiles, labelled sets written out as
class folders. Imports engine.runtime, db/ and grades.py."""
