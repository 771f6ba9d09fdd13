"""Models: the default model's provisioning, loading from local folders, fine-tuning setup."""
