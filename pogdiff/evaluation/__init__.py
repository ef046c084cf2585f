"""Evaluation: the protocol, the demo classifier, the user-data judge, metrics, paired comparisons."""
