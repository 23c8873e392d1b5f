"""Adapters that fedzero trains on frozen backbones. One folder per method (config, layer, model)."""
