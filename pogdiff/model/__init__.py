"""Models: the tiny and Stable Diffusion UNets, caption encoders, sampling, the checkpoint format."""
