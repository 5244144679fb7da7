"""Training of the hash encoders: teacher signals, losses, the training loop. Never imported by the
inference path."""
