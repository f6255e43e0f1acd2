"""Where results and checkpoints live: any pyarrow.fs store, Parquet rows, checkpoint sync, provenance."""
