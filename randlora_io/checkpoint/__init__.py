"""Hugging Face checkpoints on disk: reading safetensors headers and tensors (``safetensors_io``, ``lazy_tensors``),
sharded directories and their config (``directory``, ``base_model``), writing them streamed and atomically
(``shard_writer``, ``stream``, ``atomic``, ``disk``), and the guard on pickle archives (``archive_guard``).
The bottom layer: it imports nothing of the package but ``errors`` and ``progress``."""
