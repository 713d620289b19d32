"""The simulation engine: Flower's Ray-backed run in a child process (engine), many sites played
by one simulated node (batched), the in-process delivery of replies, and Ray's clean-up."""
