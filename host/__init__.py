"""The model host process: engine, backends, the OpenAI-compatible HTTP app, its API models and its client.

`server/` reaches it only through `host.client` (torch-free); everything else here may import torch.
"""
