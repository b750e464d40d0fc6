"""trl-gfn: align pretrained diffusion models with reward functions, keeping diversity and prior."""

__version__ = "0.1.0.dev0"
