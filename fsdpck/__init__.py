"""fsdpck: does sharded optimizer state survive a round trip through torch.distributed.checkpoint?

Importing the package has no side effects and does not import torch, so that
``fsdpck --help`` is fast and process-based async checkpointers can spawn it.
"""

__version__ = "0.2.0"
