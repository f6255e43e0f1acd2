"""Generated training data: a class-conditional diffusion generator (an artifact of the plan) and
the sharded Ray work that samples N images per class into WebDataset shards (harness/data reads
them; it never imports this package)."""
