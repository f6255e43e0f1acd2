"""What runs where: grid cells -> plan of nodes -> Ray tasks (or this process); status and resources."""
