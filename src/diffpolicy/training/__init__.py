"""Training loop, EMA and optimizer construction."""
