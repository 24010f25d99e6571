"""mlxdist: run one model across several Apple Silicon Macs with MLX."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
