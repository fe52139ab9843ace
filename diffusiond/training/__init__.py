"""Training the built-in model: a procedural shapes data set and a CPU-sized training script."""
