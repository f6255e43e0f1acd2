"""Backdoor track: poisoning attacks (data plugins), the poison plan applied inside the loader,
and the backdoor metrics (clean accuracy, attack success rate, robust accuracy under the trigger)."""
