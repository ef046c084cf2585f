"""Training: the trainer loop, its setup, its records and the run entry point."""
