"""The Flower ClientApp of a fedcore site (loaded by Flower from the app directory)."""
