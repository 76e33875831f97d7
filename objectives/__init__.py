"""Image scorers: the objectives a study optimizes and the metrics that evaluate it."""
