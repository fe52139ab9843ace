"""Model directories: the built-in model, configs read from disk, I/O descriptors."""
