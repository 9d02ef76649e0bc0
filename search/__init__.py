"""Search: search space and budget, evolutionary search, checkpoint state, evaluator backends."""
