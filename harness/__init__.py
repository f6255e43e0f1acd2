"""robustgrid's harness: config, data, attacks, the DDP trainer, evaluation, results and the grid."""
__version__ = "0.1.0"
