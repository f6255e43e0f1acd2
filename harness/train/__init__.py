"""The DDP trainer and its learning-rate schedule: knows the method contract, no one method."""
