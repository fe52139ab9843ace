"""The backend-agnostic text-to-image algorithm: written once, run on any backend."""
