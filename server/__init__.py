"""The Flower ServerApp of fedcore (loaded by Flower from the app directory)."""
