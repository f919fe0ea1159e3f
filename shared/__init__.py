"""Code common to hospital clients and the aggregation server: model, data, prompts, metrics, wire format."""

__version__ = "0.1.0"
