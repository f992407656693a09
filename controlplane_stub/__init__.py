"""A mini Kubernetes control plane: API server, controllers and node agents."""
__version__ = "0.1.0"
