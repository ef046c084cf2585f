"""The method: loss formulas, objectives, caption neighbours and psi, kNN search, data preparation."""
