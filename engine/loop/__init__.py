"""The curation loop around the model: the Retrain page's settings, the loop-gain experiment,
the review queue's order, reader agreement, model export and import, the demo workspace.
May import every other group."""
