"""Tensors <-> bytes on the wire (safetensors and JSON) and content negotiation; no HTTP framework here."""
