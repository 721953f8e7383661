"""optserve: optimizer-as-a-service, numerically identical to torch.optim."""

__version__ = "0.1.0"
