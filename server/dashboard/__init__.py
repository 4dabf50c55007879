"""The web dashboard: kernels, versions, runs (live), experiences, the review queue, and operator actions."""
