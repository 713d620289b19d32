"""Site-level DP mechanisms, one object each, with a site half and a server half."""
