"""Training: the trainer loop, what it sets up, the run folder it writes and the run entry point."""
