"""Post-training backdoor defenses that prune or gate neurons (CLP, ANP, NC, ...), one file each,
sharing methods/backdoor/masks.py. The older defenses stay at methods/ft.py, fp.py, nad.py."""
