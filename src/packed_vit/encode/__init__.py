"""Images -> embeddings with a packed tower: `python -m packed_vit encode` (and the demo) run this.

Four stages, one module each:
- `inputs`: files, folders, list files and webdataset tar shards -> parts -> samples, in input order;
- `pipeline`: samples decoded and preprocessed in DataLoader workers (or on the GPU, `gpu_preprocessing`), packed
  into forwards by a token budget, forwards queued back to back -> per-image embeddings in input order;
- `output`: one safetensors file, or a folder of atomically written shards with a manifest (resumable);
  `load_embeddings` reads either;
- `ranks`: torchrun's processes share the parts, one manifest for all.
`job` ties them together (`encode_images` in Python, `run_job` for the command).

Messy data and faults (docs/encode-faults.md): damaged inputs are skipped and named with their reason, a damaged tar
shard keeps its readable samples; writes are atomic, shards are checked on resume, one run holds a folder at a time;
Ctrl-C / SIGTERM leave a resumable folder; the exit status says whether anything was skipped.

Each image gets one pooled vector: the tower's `pooler_output` when the checkpoint has a head, else the mean of its
patch features (`last_hidden_state`); optionally the patch features themselves, with their `grid_thw`.
"""

from .inputs import IMAGE_EXTENSIONS, UNREADABLE, find_images, find_parts, read_image
from .job import DEFAULT_MAX_TOKENS, DEFAULT_SHARD_SIZE, Progress, encode_images, load_model_and_processor, run_job
from .output import POOLED_BY_HEAD, POOLED_BY_MEAN, Embeddings, load_embeddings, save_embeddings
from .pipeline import default_workers, mean_per_image, token_budget_batches

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SHARD_SIZE",
    "IMAGE_EXTENSIONS",
    "POOLED_BY_HEAD",
    "POOLED_BY_MEAN",
    "UNREADABLE",
    "Embeddings",
    "Progress",
    "default_workers",
    "encode_images",
    "find_images",
    "find_parts",
    "load_embeddings",
    "load_model_and_processor",
    "mean_per_image",
    "read_image",
    "run_job",
    "save_embeddings",
    "token_budget_batches",
]
