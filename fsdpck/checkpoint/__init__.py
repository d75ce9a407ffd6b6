"""Checkpoint locations and what is in them: storage (local, fsspec), DCP's reader and writer as
fsdpck hands them to DCP, the manifest, the restricted unpickler, the metadata model,
integrity checks and offline reading."""
